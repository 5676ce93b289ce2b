#!/usr/bin/env bash
# The main job: until `camelid quickstart` exists, describe Llama 3.1 8B and run a forward
# pass of the tiny preset on this machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
camelid inspect llama-3.1-8b
camelid inspect tiny --forward

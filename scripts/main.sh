#!/usr/bin/env bash
# The main job: `camelid quickstart` on the built-in corpus — tokenizer, data, a small Llama
# trained for a few minutes, its validation loss, a sample completion and exported weights.
# Extra arguments go to `camelid quickstart` (see `camelid quickstart --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
camelid quickstart "$@"

#!/usr/bin/env bash
# Lint, format check and the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
ruff check .
ruff format --check .
python -m pytest "$@"

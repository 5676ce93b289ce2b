#!/usr/bin/env bash
# Create or reuse the local virtualenv (.venv) and install camelid into it.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run any number of times.
#
#   CAMELID_TORCH   pip requirement for PyTorch (default: torch==2.13.0, a CPU build here;
#                   e.g. CAMELID_TORCH="torch==2.13.0 --index-url <your CUDA wheel index>")
#   CAMELID_VENV    virtualenv directory (default: .venv in the repository)
#   CAMELID_PYTHON  interpreter used to create the virtualenv (default: python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CAMELID_VENV:-$root/.venv}"
torch_req="${CAMELID_TORCH:-torch==2.13.0}"
python="${CAMELID_PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv $venv"
  "$python" -m venv "$venv"
fi

# Reinstall only when the requirements changed: a stamp holds the hash of what was installed.
stamp="$venv/.camelid-stamp"
want="$( (echo "$torch_req"; cat "$root/pyproject.toml") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $torch_req and camelid[test] into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086  # the requirement may carry pip options on purpose
  "$venv/bin/python" -m pip install -q $torch_req
  "$venv/bin/python" -m pip install -q -e "$root[test]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"

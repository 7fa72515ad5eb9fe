#!/usr/bin/env bash
# Creates .venv and installs raysam into it. Idempotent: re-runs only when pyproject.toml changed.
#   scripts/bootstrap.sh            runtime dependencies (enough for the demo)
#   scripts/bootstrap.sh dev        plus the export (torch) and test extras
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "dev" ] && extras="[export,test]"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-${1:-runtime}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras}"
  touch "$stamp"
fi

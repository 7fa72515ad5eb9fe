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
  if [ "${1:-}" = "dev" ]; then
    # fiboa-cli (the test's fiboa validator) pins pyarrow<24 and fsspec==2025.7.0: its own venv.
    [ -x .venv/fiboa/bin/python ] || "$py" -m venv .venv/fiboa
    .venv/fiboa/bin/python -m pip install -q "fiboa-cli==0.21.0"
  fi
  touch "$stamp"
fi

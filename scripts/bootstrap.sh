#!/usr/bin/env bash
# Creates .venv and installs raysam into it. Idempotent: re-runs only when pyproject.toml changed.
#   scripts/bootstrap.sh            runtime dependencies (enough for the demo)
#   scripts/bootstrap.sh dev        plus the export (torch) and test extras
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "dev" ] && extras="[export,test]"
py="${PYTHON:-python3}"

# `pip install ARGS` into the environment of python $1. uv installs the same pins as pip, faster
# (the dev set with torch and fiboa-cli's venv, bytecode compiled, 2 cores: about 60 s from an empty
# uv cache in .ci/run, against 150-190 s with pip). uv reads no pip configuration, so pip's indexes
# and certificate (as environment variables, not arguments), find-links and constraints are handed
# to it, and it takes the best match over every index, as pip does. It compiles the bytecode at
# install, as pip does: where PYTHONDONTWRITEBYTECODE is set (CI), every Python and Ray worker
# process would otherwise compile each module it imports, every time (the suite ran 1.7x slower).
# pip itself is the fallback where uv cannot be installed.
install() {
  local python="$1"; shift
  if ! [ -x .venv/bin/uv ] && ! .venv/bin/python -m pip install -q uv >/dev/null 2>&1; then
    "$python" -m pip install -q "$@"
    return
  fi
  (  # a subshell: the UV_* variables stay with this call
    flags=(--index-strategy unsafe-best-match)
    while IFS='=' read -r key value; do
      value="${value#\'}" && value="${value%\'}"
      case "$key" in
        *.index-url) export UV_INDEX_URL="$value" ;;
        *.extra-index-url) export UV_EXTRA_INDEX_URL="${UV_EXTRA_INDEX_URL:+$UV_EXTRA_INDEX_URL }$value" ;;
        *.find-links) for v in $value; do flags+=(--find-links "$v"); done ;;
        *.constraint) for v in $value; do flags+=(--constraint "$v"); done ;;
        *.cert) export SSL_CERT_FILE="$value" ;;
      esac
    done < <(.venv/bin/python -m pip config list)
    .venv/bin/uv pip install -q --compile-bytecode --python "$python" "${flags[@]}" "$@"
  )
}

[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-${1:-runtime}"
if [ ! -f "$stamp" ]; then
  install .venv/bin/python -e ".${extras}"
  if [ "${1:-}" = "dev" ]; then
    # fiboa-cli (the test's fiboa validator) pins pyarrow<24 and fsspec==2025.7.0: its own venv.
    [ -x .venv/fiboa/bin/python ] || "$py" -m venv .venv/fiboa
    install .venv/fiboa/bin/python "fiboa-cli==0.21.0"
  fi
  touch "$stamp"
fi

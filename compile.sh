#!/usr/bin/env bash
# Install pbkv and everything it needs into .venv (run once after cloning).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,compile]'
# The request path compiled with mypyc, when there is a C compiler (pbkv/compiled.py).
bin/build_native
# An editable install leaves no bytecode: without it each server start compiles every
# module again (a tenth of a second) when PYTHONDONTWRITEBYTECODE is set.
.venv/bin/python -m compileall -q pbkv >/dev/null
echo "pbkv installed in .venv"
if ! command -v etcd >/dev/null; then
  echo "note: etcd not found; high availability and its tests (tests/etcd) need it" \
    "(Debian: apt-get install etcd-server)"
fi

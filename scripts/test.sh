#!/usr/bin/env bash
# Runs the test suite in its own virtualenv (created or reused), installing what it needs.
#   PYTHON=python3.12 bash scripts/test.sh     # another interpreter, in .venv-<version>
#   bash scripts/test.sh -k stateful           # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
venv="${VENV:-.venv-$version}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
"$venv/bin/python" -c 'import jax, sys; print(f"python {sys.version.split()[0]}, jax {jax.__version__}")'
exec "$venv/bin/python" -m pytest -q "$@"

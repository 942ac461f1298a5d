#!/usr/bin/env bash
# The main job: runs the example decode loop on the paged cache, in its own virtualenv
# (created or reused), installing what it needs. Extra arguments go to the example.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
venv="${VENV:-.venv-$version}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[examples]'
exec "$venv/bin/python" examples/decode_loop.py "$@"

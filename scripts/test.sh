#!/usr/bin/env bash
# The test suite, in its own virtualenv (created or reused) with everything it needs.
#   PYTHON=python3.12 bash scripts/test.sh     # another interpreter, in .venv-<version>
#   bash scripts/test.sh -k stateful           # extra arguments go to pytest
source "$(dirname "$0")/venv.sh" test
# Hugging Face transformers is the independent oracle of the model tests. The torch wheel is
# taken only from local wheels (pip's find-links), never downloaded: PyPI's default torch is a
# several-GB CUDA build. Its small dependencies come from the index. Without a local wheel the
# parity tests skip and say why.
if pip install --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then
  pip install torch==2.13.0 -e ".[oracle]"
else
  echo "torch 2.13.0 is not available offline: the Hugging Face parity tests will be skipped"
fi
"$venv/bin/python" -c 'import jax, sys; print(f"python {sys.version.split()[0]}, jax {jax.__version__}")'
exec "$venv/bin/python" -m pytest -q "$@"

#!/usr/bin/env bash
# The main job: SmolLM2-135M-Instruct answering chat prompts on jaxpaged's paged cache, offline.
# Arguments go to examples/generate.py (prompts, --max-new-tokens, --temperature, --gguf, ...).
source "$(dirname "$0")/venv.sh" examples
exec "$venv/bin/python" examples/generate.py "$@"

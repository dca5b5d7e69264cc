"""The offline side: Hugging Face VLM → bundle. Needs `pip install 'edgevlm[export]'` (torch, transformers, onnx).

One folder per model family (`exporters/<family>/`, its `FAMILY` in `__init__.py`), registered here by the Hugging
Face architecture name it exports; the mechanics families share are modules beside them.
"""

from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError

# architecture (config.json "architectures") -> module defining `FAMILY`
FAMILY_MODULES = {
    "Qwen2VLForConditionalGeneration": "edgevlm.exporters.qwen2_vl",
    "LlavaForConditionalGeneration": "edgevlm.exporters.llava",
    "Qwen2_5_VLForConditionalGeneration": "edgevlm.exporters.qwen2_5_vl",
}

# short names users type -> hub ids
ALIASES = {
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}
# short names -> model directories shipped inside edgevlm (no hub needed), as (package, folder)
PACKAGED_MODELS = {
    "demo": ("edgevlm.demo", "model"),  # the tiny Qwen2-VL trained on synthetic scenes (`edgevlm demo`)
}


def family_for(architecture: str):
    """The exporter family for a Hugging Face architecture name."""
    module = FAMILY_MODULES.get(architecture)
    if module is None:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; edgevlm exports "
            f"{', '.join(sorted(FAMILY_MODULES))} (aliases: {', '.join(sorted({**ALIASES, **PACKAGED_MODELS}))})."
        )
    return importlib.import_module(module).FAMILY


def export(*args, **kwargs):
    """See `edgevlm.exporters.bundle_export.export`."""
    from .bundle_export import export as _export

    return _export(*args, **kwargs)

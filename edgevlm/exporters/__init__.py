"""The offline side: Hugging Face VLM → bundle. Needs `pip install 'edgevlm[export]'` (torch, transformers, onnx).

One folder per model family (`exporters/<family>/`), found by `discovery`; the mechanics families share are plain
modules beside the folders (`family`, `onnx_export`, `gguf`, `bundle_export`, `verify`, ...).
"""

from __future__ import annotations

from .discovery import PACKAGED_MODELS, aliases, architectures, families, family_for

__all__ = ["PACKAGED_MODELS", "aliases", "architectures", "export", "families", "family_for"]


def export(*args, **kwargs):
    """See `edgevlm.exporters.bundle_export.export`."""
    from .bundle_export import export as _export

    return _export(*args, **kwargs)

"""InternVL3 (InternVLForConditionalGeneration, the transformers-native "-hf" checkpoints): what is specific to this
family on the export side.

The InternViT tower + pixel shuffle + projector go to ONNX, one 448 px view per call (`vision`); the Qwen2.5
language model to a plain `qwen2` GGUF with Qwen2's tokenizer and InternVL's added tokens (`qwen2vl_gguf`'s
`QWEN2_FORMAT`). In the manifest: preprocessing kind `tiles-internvl` (min..max_patches tiles by aspect ratio plus a
thumbnail, 256 tokens each), no patch position input, `linear` positions, and `<IMG_CONTEXT>` as the template's
placeholder, which the runtime replaces by `<img>`, the views' embeddings and `</img>` as `InternVLProcessor` does.
This module also gives transformers' inputs that parity checks compare a bundle against.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ...contract.kinds.patch_positions import NoPatchPositions
from ...contract.kinds.positions import Linear
from ...contract.kinds.tiles_internvl import TilesInternVL
from ...contract.manifest import TokenSpec, VisionSpec
from ...errors import UnsupportedModelError
from ...images import load_image
from ..checkpoint import WeightSource, checkpoint_weights, load_model, vision_release
from ..family import Family, Loaded, find_chat_template
from ..onnx_export import vit_vision_spec
from ..qwen2vl_gguf import QWEN2_CHAT_TOKENS, QWEN2_FORMAT, write_qwen2_vl_llm_gguf

IMAGE_CONTEXT, IMAGE_START, IMAGE_END = "<IMG_CONTEXT>", "<img>", "</img>"
LLM_FORMAT = replace(QWEN2_FORMAT, special_tokens={**QWEN2_CHAT_TOKENS, "image_start": IMAGE_START, "image_end": IMAGE_END, "image_context": IMAGE_CONTEXT})  # fmt: skip


def language_weights(weights: WeightSource, vision_parts: tuple[str, ...]) -> WeightSource:
    """`weights` without the vision parts' tensors (they go to ONNX, not the GGUF)."""
    prefixes = tuple(f"{part}." for part in vision_parts)

    def language(shapes_only: bool) -> Iterator[tuple[str, Any]]:
        return ((name, tensor) for name, tensor in weights(shapes_only) if not name.startswith(prefixes))

    return language


class InternVLFamily(Family):
    name = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    aliases = MappingProxyType({"internvl3-1b": "OpenGVLab/InternVL3-1B-hf", "internvl3-2b": "OpenGVLab/InternVL3-2B-hf"})  # fmt: skip
    vision_parts = ("model.vision_tower", "model.multi_modal_projector")

    def load(self, model_dir: Path, *, vision_only: bool = False) -> Loaded:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        from .vision import merge_size

        model = load_model(InternVLForConditionalGeneration, model_dir, self.vision_parts, vision_only=vision_only)
        merge = merge_size(model.config)  # refuses feature settings the graph does not reproduce, before exporting
        LLM_FORMAT.hparams(model.config)  # and language model settings llama.cpp would compute differently
        vision_config = model.config.vision_config
        preprocessor_config = model_dir / "preprocessor_config.json"
        config = json.loads(preprocessor_config.read_text()) if preprocessor_config.is_file() else {}
        patch_size = vision_config.patch_size[0] if isinstance(vision_config.patch_size, (list, tuple)) else vision_config.patch_size  # fmt: skip
        try:
            preprocessing = TilesInternVL.from_preprocessor_config(config, patch_size=patch_size, merge_size=merge)
        except ValueError as e:
            raise UnsupportedModelError(str(e)) from e
        image_size = tuple(vision_config.image_size) if isinstance(vision_config.image_size, (list, tuple)) else (vision_config.image_size,) * 2  # fmt: skip
        if image_size != (preprocessing.tile_size,) * 2:
            raise UnsupportedModelError(f"the processor cuts {preprocessing.tile_size} px tiles, the vision tower takes {image_size} px")  # fmt: skip
        tokens_per_view = preprocessing.tile_tokens
        if model.config.image_seq_length != tokens_per_view:
            raise UnsupportedModelError(f"image_seq_length={model.config.image_seq_length}, but a view makes {tokens_per_view} tokens")  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        release = vision_release(model, self.vision_parts, vision_only=vision_only)
        return Loaded(model_dir, model, tokenizer, preprocessing, find_chat_template(tokenizer, model_dir), release)

    def export_vision(self, loaded: Loaded, out_dir: Path, dtypes: tuple[str, ...]) -> VisionSpec:
        from .vision import export_internvl_vision

        report = export_internvl_vision(loaded.model, out_dir, dtypes=dtypes, release_torch=loaded.release_vision)
        return vit_vision_spec(report, dtypes, loaded.model.config, NoPatchPositions())

    def export_llm(self, loaded: Loaded, path: Path, dtype: str) -> dict:
        weights = language_weights(checkpoint_weights(loaded.model, loaded.model_dir), self.vision_parts)
        return write_qwen2_vl_llm_gguf(loaded.model, loaded.tokenizer, path, dtype=dtype, chat_template=loaded.chat_template, llm_format=LLM_FORMAT, weights=weights)  # fmt: skip

    def tokens(self, loaded: Loaded) -> TokenSpec:
        image_id = int(loaded.model.config.image_token_id)
        if loaded.tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT) != image_id:
            raise UnsupportedModelError(f"the tokenizer's {IMAGE_CONTEXT} is not the config's image_token_id {image_id}")  # fmt: skip
        return TokenSpec(image_pad=IMAGE_CONTEXT)

    def positions(self, loaded: Loaded) -> Linear:
        return Linear(merge_size=loaded.preprocessing.merge_size)

    # -- the transformers reference, for parity checks ------------------------------------------------------------
    def reference_inputs(self, loaded: Loaded, prompt: str, images: list[Any]) -> dict:
        """transformers' own inputs for one user turn: its chat template and `InternVLProcessor` (with
        `GotOcr2ImageProcessorPil`), which tiles each image and writes `<img>` + `<IMG_CONTEXT>` per token +
        `</img>` for each `<IMG_CONTEXT>` of the template."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        template = loaded.chat_template
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=template)  # fmt: skip
        processor = internvl_processor(loaded.tokenizer, loaded.preprocessing)
        pictures = [load_image(image) for image in images] or None
        inputs = processor(text=text, images=pictures, return_tensors="pt")
        return {key: inputs[key] for key in ("input_ids", "pixel_values") if key in inputs}

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from .synthetic import build_internvl

        return build_internvl(out_dir, seed=seed)


def internvl_processor(tokenizer: Any, spec: TilesInternVL, **overrides: Any) -> Any:
    """transformers' `InternVLProcessor` for images, with the `GotOcr2ImageProcessorPil` of `spec` (`overrides`
    change its settings, e.g. max_patches). Its video processor needs torchvision, which images do not: the
    processor is built without one."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    class ImageInternVLProcessor(InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    settings = {
        "size": {"height": spec.tile_size, "width": spec.tile_size}, "min_patches": spec.min_patches,
        "max_patches": spec.max_patches, "image_mean": list(spec.image_mean), "image_std": list(spec.image_std),
        "rescale_factor": spec.rescale_factor, **overrides,
    }  # fmt: skip
    image_processor = GotOcr2ImageProcessorPil(**settings)
    return ImageInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_length=spec.tile_tokens)  # fmt: skip


FAMILY = InternVLFamily()

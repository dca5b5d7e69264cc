"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): what is specific to this family on the export side.

The SigLIP tower + projector + AnyRes packing go to ONNX (`vision`), the Qwen2 language model to a plain `qwen2`
GGUF (`qwen2vl_gguf.QWEN2_FORMAT`) with its tokenizer and chat template. In the manifest: preprocessing kind
`tiles-anyres` (`edgevlm.contract.kinds.tiles_anyres`: an image's base and tiles are one view, packed by the graph),
patch positions `packed-tokens` (the graph takes the view's token sources and weights), `linear` positions, and
`<image>` as the placeholder the runtime replaces with the image's embeddings. This module also gives
transformers' inputs that parity checks compare a bundle against.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ...contract.kinds.patch_positions import PackedTokens
from ...contract.kinds.positions import Linear
from ...contract.kinds.tiles_anyres import AnyResTiles
from ...contract.manifest import TokenSpec, VisionSpec
from ...errors import UnsupportedModelError
from ...images import load_image
from ..checkpoint import Checkpoint, WeightSource, checkpoint_weights, load_model, vision_release
from ..family import Family, Loaded, find_chat_template
from ..onnx_export import vit_vision_spec
from ..qwen2vl_gguf import QWEN2_CHAT_TOKENS, QWEN2_FORMAT, write_qwen2_vl_llm_gguf

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
LLM_FORMAT = dataclasses.replace(QWEN2_FORMAT, special_tokens={**QWEN2_CHAT_TOKENS, "image_pad": IMAGE_TOKEN})
VISION_KEYS = ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")
NEWLINE_NAMES = ("model.image_newline", "image_newline")  # transformers >= 4.52's checkpoints, then llava-hf's


def _language_model_weights(weights: WeightSource) -> WeightSource:
    """`weights` without the vision tower, projector and image_newline (they are in the ONNX graph)."""

    def language_model(shapes_only: bool) -> Iterator[tuple[str, Any]]:
        return ((name, tensor) for name, tensor in weights(shapes_only) if not name.startswith(VISION_KEYS))

    return language_model


def _load_newline(model: Any, model_dir: Path) -> None:
    """`image_newline` (a parameter, not a module: `load_model` leaves it unloaded) from the checkpoint, float32."""
    import torch

    checkpoint = Checkpoint(model_dir)
    name = next((n for n in NEWLINE_NAMES if n in checkpoint.files), None)
    if name is None:
        raise UnsupportedModelError(f"{model_dir}'s checkpoint has no image_newline (looked for {', '.join(NEWLINE_NAMES)})")  # fmt: skip
    model.model.image_newline = torch.nn.Parameter(checkpoint.tensor(name).to(torch.float32), requires_grad=False)


class LlavaOnevisionFamily(Family):
    name = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    aliases = MappingProxyType({"llava-onevision-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"})
    vision_parts = ("model.vision_tower", "model.multi_modal_projector")

    def load(self, model_dir: Path, *, vision_only: bool = False) -> Loaded:
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

        from .vision import feature_layer_count

        model = load_model(LlavaOnevisionForConditionalGeneration, model_dir, self.vision_parts, vision_only=vision_only)  # fmt: skip
        feature_layer_count(model.config)  # refuses feature settings the graph does not reproduce, before exporting
        if vision_only:
            _load_newline(model, model_dir)
        config = model.config
        preprocessor_config = model_dir / "preprocessor_config.json"
        processor = json.loads(preprocessor_config.read_text()) if preprocessor_config.is_file() else {}
        try:
            preprocessing = AnyResTiles.from_preprocessor_config(
                processor, patch_size=config.vision_config.patch_size, vision_aspect_ratio=config.vision_aspect_ratio,
                grid_pinpoints=config.image_grid_pinpoints,
            )  # fmt: skip
        except ValueError as e:
            raise UnsupportedModelError(f"{model_dir}: {e}") from e
        if preprocessing.tile_size != config.vision_config.image_size:
            raise UnsupportedModelError(f"the processor makes {preprocessing.tile_size} px tiles, the vision tower takes {config.vision_config.image_size} px")  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        release = vision_release(model, self.vision_parts, vision_only=vision_only)
        return Loaded(model_dir, model, tokenizer, preprocessing, find_chat_template(tokenizer, model_dir), release)

    def export_vision(self, loaded: Loaded, out_dir: Path, dtypes: tuple[str, ...]) -> VisionSpec:
        from .vision import export_onevision_vision, feature_layer_count

        report = export_onevision_vision(loaded.model, loaded.preprocessing, out_dir, dtypes=dtypes, release_torch=loaded.release_vision)  # fmt: skip
        return vit_vision_spec(
            report, dtypes, loaded.model.config, PackedTokens(), depth=feature_layer_count(loaded.model.config)
        )

    def export_llm(self, loaded: Loaded, path: Path, dtype: str) -> dict:
        weights = _language_model_weights(checkpoint_weights(loaded.model, loaded.model_dir))
        return write_qwen2_vl_llm_gguf(loaded.model, loaded.tokenizer, path, dtype=dtype, chat_template=loaded.chat_template, llm_format=LLM_FORMAT, weights=weights)  # fmt: skip

    def tokens(self, loaded: Loaded) -> TokenSpec:
        image_id = int(loaded.model.config.image_token_id)
        if loaded.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_id:
            raise UnsupportedModelError(f"the tokenizer's {IMAGE_TOKEN} is not the config's image_token_id {image_id}")
        return TokenSpec(image_pad=IMAGE_TOKEN)

    def positions(self, loaded: Loaded) -> Linear:
        return Linear(merge_size=1)

    # -- the transformers reference, for parity checks ------------------------------------------------------------
    def reference_inputs(self, loaded: Loaded, prompt: str, images: list[Any]) -> dict:
        """transformers' own inputs for one user turn: its chat template and `LlavaOnevisionProcessor` (several
        images in one prompt are not tiled, as that processor does it for a prompt's image list)."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=loaded.chat_template)  # fmt: skip
        processor = reference_processor(loaded)
        pictures = [[load_image(image) for image in images]] if images else None
        inputs = processor(text=[text], images=pictures, return_tensors="pt")
        return {key: inputs[key] for key in ("input_ids", "pixel_values", "image_sizes", "batch_num_images") if key in inputs}  # fmt: skip

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from .synthetic import build_llava_onevision

        return build_llava_onevision(out_dir, seed=seed)


def reference_processor(loaded: Loaded) -> Any:
    """transformers' `LlavaOnevisionProcessor` of the loaded model, without its video processor (which needs
    torchvision)."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    class ImagesOnlyProcessor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, attribute_name: str, arg: Any) -> Any:
            return None if attribute_name == "video_processor" else super().check_argument_for_proper_class(attribute_name, arg)  # fmt: skip

    spec, config = loaded.preprocessing, loaded.model.config
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": spec.tile_size, "width": spec.tile_size}, image_grid_pinpoints=[list(p) for p in spec.grid_pinpoints],
        image_mean=list(spec.image_mean), image_std=list(spec.image_std), rescale_factor=spec.rescale_factor,
    )  # fmt: skip
    return ImagesOnlyProcessor(
        image_processor=image_processor, tokenizer=loaded.tokenizer, num_image_tokens=spec.patches_per_side**2,
        vision_feature_select_strategy=config.vision_feature_select_strategy, vision_aspect_ratio=config.vision_aspect_ratio,
    )  # fmt: skip


FAMILY = LlavaOnevisionFamily()

"""LLaVA-1.5 (LlavaForConditionalGeneration): what is specific to this family on the export side.

The CLIP vision tower + projector go to ONNX (`vision`), the Llama language model to a `llama` GGUF with its
SentencePiece tokenizer (`llm`). In the manifest: preprocessing kind `fixed-resize` (one fixed size, 576 tokens per
image for 336 px and patch 14), no patch position input, `linear` positions, and `<image>` as the placeholder the
runtime replaces with the image's embeddings. This module also gives transformers' inputs that parity checks compare
a bundle against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ...contract.kinds.patch_positions import NoPatchPositions
from ...contract.kinds.positions import Linear
from ...contract.kinds.preprocessing import FixedResize
from ...contract.manifest import TokenSpec, VisionSpec
from ...errors import UnsupportedModelError
from ...images import load_image
from ..checkpoint import checkpoint_weights, load_model, vision_release
from ..family import Family, Loaded, find_chat_template
from ..onnx_export import vit_vision_spec
from .llm import IMAGE_TOKEN, write_llava_llm_gguf

logger = logging.getLogger(__name__)

SENTENCEPIECE_MODEL = "tokenizer.model"


class LlavaFamily(Family):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    aliases = MappingProxyType({"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf"})
    vision_parts = ("model.vision_tower", "model.multi_modal_projector")

    def load(self, model_dir: Path, *, vision_only: bool = False) -> Loaded:
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from .vision import feature_layer_count

        if not (model_dir / SENTENCEPIECE_MODEL).is_file():
            raise UnsupportedModelError(f"{model_dir} has no {SENTENCEPIECE_MODEL}: the GGUF's SentencePiece tokenizer is built from it")  # fmt: skip
        model = load_model(LlavaForConditionalGeneration, model_dir, self.vision_parts, vision_only=vision_only)
        feature_layer_count(model.config)  # refuses feature settings the graph does not reproduce, before exporting
        vision_config = model.config.vision_config
        preprocessor_config = model_dir / "preprocessor_config.json"
        config = json.loads(preprocessor_config.read_text()) if preprocessor_config.is_file() else {}
        preprocessing = FixedResize.from_preprocessor_config(config, patch_size=vision_config.patch_size)
        if preprocessing.crop_size != vision_config.image_size:
            raise UnsupportedModelError(f"the processor crops {preprocessing.crop_size} px images, the vision tower takes {vision_config.image_size} px")  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        release = vision_release(model, self.vision_parts, vision_only=vision_only)
        return Loaded(model_dir, model, tokenizer, preprocessing, find_chat_template(tokenizer, model_dir), release)

    def export_vision(self, loaded: Loaded, out_dir: Path, dtypes: tuple[str, ...]) -> VisionSpec:
        from .vision import export_llava_vision, feature_layer_count

        report = export_llava_vision(loaded.model, out_dir, dtypes=dtypes, release_torch=loaded.release_vision)
        return vit_vision_spec(
            report, dtypes, loaded.model.config, NoPatchPositions(), depth=feature_layer_count(loaded.model.config)
        )

    def export_llm(self, loaded: Loaded, path: Path, dtype: str) -> dict:
        return write_llava_llm_gguf(loaded.model, loaded.tokenizer, loaded.model_dir / SENTENCEPIECE_MODEL, path, dtype=dtype, chat_template=loaded.chat_template, weights=checkpoint_weights(loaded.model, loaded.model_dir))  # fmt: skip

    def tokens(self, loaded: Loaded) -> TokenSpec:
        image_id = int(loaded.model.config.image_token_id)
        if loaded.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_id:
            raise UnsupportedModelError(f"the tokenizer's {IMAGE_TOKEN} is not the config's image_token_id {image_id}")
        return TokenSpec(image_pad=IMAGE_TOKEN)

    def positions(self, loaded: Loaded) -> Linear:
        return Linear(merge_size=1)

    # -- the transformers reference, for parity checks ------------------------------------------------------------
    def reference_inputs(self, loaded: Loaded, prompt: str, images: list[Any]) -> dict:
        """transformers' own inputs for one user turn: its chat template, image processor and tokenizer, with
        `<image>` repeated once per image token as `LlavaProcessor` does it."""
        from transformers import LlavaImageProcessorPil

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        template = loaded.chat_template
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=template)  # fmt: skip
        inputs: dict = {}
        if images:
            spec = loaded.preprocessing
            processor = LlavaImageProcessorPil(
                size={"shortest_edge": spec.shortest_edge}, crop_size={"height": spec.crop_size, "width": spec.crop_size},
                do_pad=spec.pad_to_square, image_mean=list(spec.image_mean), image_std=list(spec.image_std),
                rescale_factor=spec.rescale_factor,
            )  # fmt: skip
            inputs["pixel_values"] = processor(images=[load_image(image) for image in images], return_tensors="pt")["pixel_values"]  # fmt: skip
            text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * spec.token_range()[0])
        inputs["input_ids"] = loaded.tokenizer(text, return_tensors="pt").input_ids
        return inputs

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from .synthetic import build_llava

        return build_llava(out_dir, seed=seed)


FAMILY = LlavaFamily()

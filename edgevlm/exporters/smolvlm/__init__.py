"""SmolVLM2 and Idefics3 (SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration): what is specific to
this family on the export side.

The SigLIP tower + pixel-shuffle connector go to ONNX, one tile per call (`vision`), the Llama language model to a
`llama` GGUF with its byte-level BPE tokenizer (`llm`). In the manifest: preprocessing kind `tiles-idefics3` (the
processor's LANCZOS resizes, a grid of square tiles plus a global view, and the `<fake_token_around_image>`,
`<row_r_col_c>`, `<global-img>` text between them), no patch position input, `linear` positions, and `<image>` as the
placeholder the runtime replaces with the image's layout. This module also gives transformers' inputs that parity
checks compare a bundle against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ...contract.kinds.patch_positions import NoPatchPositions
from ...contract.kinds.positions import Linear
from ...contract.kinds.tiles_idefics3 import Idefics3Tiles
from ...contract.manifest import TokenSpec, VisionSpec
from ...errors import UnsupportedModelError
from ...images import load_image
from ..checkpoint import checkpoint_weights, load_model, vision_release
from ..family import Family, Loaded, find_chat_template
from ..onnx_export import vit_vision_spec

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


def model_class(model_dir: Path) -> Any:
    """transformers' class for the checkpoint's architecture (SmolVLM2's or Idefics3's: the same layout)."""
    import transformers

    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    name = next((a for a in architectures if a in SmolVLMFamily.architectures), SmolVLMFamily.architectures[0])
    return getattr(transformers, name)


class SmolVLMFamily(Family):
    name = "smolvlm"
    architectures = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
    aliases = MappingProxyType({
        "smolvlm2-256m": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
        "smolvlm2-500m": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
        "smolvlm2-2.2b": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    })  # fmt: skip
    vision_parts = ("model.vision_model", "model.connector")

    def load(self, model_dir: Path, *, vision_only: bool = False) -> Loaded:
        from transformers import AutoTokenizer

        from .llm import check_pre_tokenizer
        from .vision import check_connector

        model = load_model(model_class(model_dir), model_dir, self.vision_parts, vision_only=vision_only)
        check_connector(model.config)
        preprocessor_config = model_dir / "preprocessor_config.json"
        config = json.loads(preprocessor_config.read_text()) if preprocessor_config.is_file() else {}
        vision_config = model.config.vision_config
        preprocessing = Idefics3Tiles.from_preprocessor_config(config, patch_size=vision_config.patch_size, scale_factor=model.config.scale_factor)  # fmt: skip
        if preprocessing.tile_size != vision_config.image_size:
            raise UnsupportedModelError(f"the processor cuts {preprocessing.tile_size} px tiles, the vision tower takes {vision_config.image_size} px")  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        check_pre_tokenizer(tokenizer)
        release = vision_release(model, self.vision_parts, vision_only=vision_only)
        return Loaded(model_dir, model, tokenizer, preprocessing, find_chat_template(tokenizer, model_dir), release)

    def export_vision(self, loaded: Loaded, out_dir: Path, dtypes: tuple[str, ...]) -> VisionSpec:
        from .vision import export_smolvlm_vision

        report = export_smolvlm_vision(loaded.model, out_dir, dtypes=dtypes, release_torch=loaded.release_vision)
        return vit_vision_spec(report, dtypes, loaded.model.config, NoPatchPositions())

    def export_llm(self, loaded: Loaded, path: Path, dtype: str) -> dict:
        from .llm import write_smolvlm_llm_gguf

        return write_smolvlm_llm_gguf(loaded.model, loaded.tokenizer, path, dtype=dtype, chat_template=loaded.chat_template, weights=checkpoint_weights(loaded.model, loaded.model_dir))  # fmt: skip

    def tokens(self, loaded: Loaded) -> TokenSpec:
        image_id = int(loaded.model.config.image_token_id)
        if loaded.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_id:
            raise UnsupportedModelError(f"the tokenizer's {IMAGE_TOKEN} is not the config's image_token_id {image_id}")
        return TokenSpec(image_pad=IMAGE_TOKEN)

    def positions(self, loaded: Loaded) -> Linear:
        return Linear(merge_size=loaded.preprocessing.merge_size)

    # -- the transformers reference, for parity checks ------------------------------------------------------------
    def reference_inputs(self, loaded: Loaded, prompt: str, images: list[Any]) -> dict:
        """transformers' own inputs for one user turn: its chat template, then `Idefics3Processor` (SmolVLMProcessor
        writes the same image prompt but needs `num2words`) with the PIL image processor of the checkpoint's settings,
        which splits each image and expands each `<image>`."""
        from transformers import Idefics3Processor, SmolVLMImageProcessorPil

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        template = loaded.chat_template
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=template)  # fmt: skip
        processor = Idefics3Processor(image_processor(loaded.preprocessing, SmolVLMImageProcessorPil), loaded.tokenizer, image_seq_len=loaded.preprocessing.tokens_per_view)  # fmt: skip
        pictures = [load_image(image) for image in images] or None
        inputs = processor(text=text, images=pictures, add_special_tokens=False, return_tensors="pt")
        return {key: inputs[key] for key in ("input_ids", "pixel_values", "pixel_attention_mask") if key in inputs}

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from .synthetic import build_smolvlm

        return build_smolvlm(out_dir, seed=seed)


def image_processor(spec: Idefics3Tiles, processor_class: Any) -> Any:
    """transformers' image processor with `spec`'s settings (what the parity checks compare with)."""
    return processor_class(
        size={"longest_edge": spec.longest_edge}, max_image_size={"longest_edge": spec.tile_size},
        do_image_splitting=spec.do_image_splitting, image_mean=list(spec.image_mean), image_std=list(spec.image_std),
        rescale_factor=spec.rescale_factor,
    )  # fmt: skip


FAMILY = SmolVLMFamily()

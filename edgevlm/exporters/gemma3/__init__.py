"""Gemma 3 (Gemma3ForConditionalGeneration): what is specific to this family on the export side.

The SigLIP tower + pooling projector go to ONNX (`vision`), the language model to a `gemma3` GGUF with its
SentencePiece tokenizer (`llm`). In the manifest: preprocessing kind `fixed-resize` with `resize` "square",
"bilinear" resampling and `merge_size` = the pooling kernel (896 px, patch 14, 4x4 pooling: 256 tokens per image),
no patch position input, `linear` positions, `<start_of_image>` as the template's placeholder, written as
"\\n\\n<start_of_image>" + the image + "<end_of_image>\\n\\n" (`tokens.image_prefix` / `image_suffix`, as
Gemma3Processor expands it), and `llm.image_attention` "bidirectional": an image's tokens see each other. This module
also gives transformers' inputs that parity checks compare a bundle against.
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

logger = logging.getLogger(__name__)

SENTENCEPIECE_MODEL = "tokenizer.model"
PLACEHOLDER, BOI, EOI = "<start_of_image>", "<start_of_image>", "<end_of_image>"
BILINEAR = 2  # PIL's (and transformers' PILImageResampling) number for BILINEAR
PAN_AND_SCAN_KEYS = {"pan_and_scan_min_crop_size": "pan_and_scan_min_crop_size",
                     "pan_and_scan_max_crops": "pan_and_scan_max_num_crops",
                     "pan_and_scan_min_ratio": "pan_and_scan_min_ratio_to_activate"}  # fmt: skip


def preprocessing_from_config(config: dict, vision_config: Any, mm_tokens_per_image: int) -> FixedResize:
    """`Gemma3ImageProcessor`'s settings as a `fixed-resize` spec; settings the runtime does not reproduce raise."""
    from .vision import pooling

    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if config.get(flag, True) is not True:
            raise UnsupportedModelError(f"preprocessor config {flag}={config[flag]!r}: edgevlm's Gemma 3 pipeline needs it true")  # fmt: skip
    if config.get("resample", BILINEAR) != BILINEAR:
        raise UnsupportedModelError(f"preprocessor config resample={config['resample']!r}: Gemma 3's processor resizes with BILINEAR ({BILINEAR})")  # fmt: skip
    if config.get("do_pan_and_scan"):
        logger.warning("the processor has do_pan_and_scan on: edgevlm adds its crops only when a request asks for tiles")  # fmt: skip
    size = config.get("size", {"height": vision_config.image_size, "width": vision_config.image_size})
    if size != {"height": vision_config.image_size, "width": vision_config.image_size}:
        raise UnsupportedModelError(f"the processor resizes to {size}, the vision tower takes {vision_config.image_size} px squares")  # fmt: skip
    _, kernel = pooling(vision_config, mm_tokens_per_image)
    side = vision_config.image_size
    values = {key: tuple(config[key]) for key in ("image_mean", "image_std") if config.get(key) is not None}
    if config.get("rescale_factor") is not None:
        values["rescale_factor"] = config["rescale_factor"]
    for ours, theirs in PAN_AND_SCAN_KEYS.items():
        if config.get(theirs) is not None:
            values[ours] = config[theirs]
    return FixedResize(tiling="pan-and-scan", crop_size=side, shortest_edge=side, patch_size=vision_config.patch_size, merge_size=kernel,
                       resize="square", resample="bilinear", **values)  # fmt: skip


class Gemma3Family(Family):
    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    aliases = MappingProxyType({"gemma-3-4b": "google/gemma-3-4b-it"})
    vision_parts = ("model.vision_tower", "model.multi_modal_projector")

    def load(self, model_dir: Path, *, vision_only: bool = False) -> Loaded:
        from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

        from .llm import gemma3_hparams

        if not (model_dir / SENTENCEPIECE_MODEL).is_file():
            raise UnsupportedModelError(f"{model_dir} has no {SENTENCEPIECE_MODEL}: the GGUF's SentencePiece tokenizer is built from it")  # fmt: skip
        model = load_model(Gemma3ForConditionalGeneration, model_dir, self.vision_parts, vision_only=vision_only)
        gemma3_hparams(model.config.text_config)  # refuses settings llama.cpp would compute differently, first
        preprocessor_config = model_dir / "preprocessor_config.json"
        config = json.loads(preprocessor_config.read_text()) if preprocessor_config.is_file() else {}
        preprocessing = preprocessing_from_config(config, model.config.vision_config, model.config.mm_tokens_per_image)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        release = vision_release(model, self.vision_parts, vision_only=vision_only)
        return Loaded(model_dir, model, tokenizer, preprocessing, find_chat_template(tokenizer, model_dir), release)

    def export_vision(self, loaded: Loaded, out_dir: Path, dtypes: tuple[str, ...]) -> VisionSpec:
        from .vision import export_gemma3_vision

        report = export_gemma3_vision(loaded.model, out_dir, dtypes=dtypes, release_torch=loaded.release_vision)
        return vit_vision_spec(report, dtypes, loaded.model.config, NoPatchPositions())

    def export_llm(self, loaded: Loaded, path: Path, dtype: str) -> dict:
        from .llm import write_gemma3_llm_gguf

        return write_gemma3_llm_gguf(loaded.model, loaded.tokenizer, loaded.model_dir / SENTENCEPIECE_MODEL, path, dtype=dtype, chat_template=loaded.chat_template, weights=checkpoint_weights(loaded.model, loaded.model_dir))  # fmt: skip

    def tokens(self, loaded: Loaded) -> TokenSpec:
        config, tokenizer = loaded.model.config, loaded.tokenizer
        expected = {BOI: config.boi_token_id, EOI: config.eoi_token_id}
        for token, token_id in expected.items():
            if tokenizer.convert_tokens_to_ids(token) != token_id:
                raise UnsupportedModelError(f"the tokenizer's {token} is not the config's id {token_id}")
        return TokenSpec(image_pad=PLACEHOLDER, image_prefix=f"\n\n{BOI}", image_suffix=f"{EOI}\n\n")

    def positions(self, loaded: Loaded) -> Linear:
        return Linear(merge_size=loaded.preprocessing.merge_size)

    # -- the transformers reference, for parity checks ------------------------------------------------------------
    def reference_inputs(self, loaded: Loaded, prompt: str, images: list[Any]) -> dict:
        """transformers' own inputs for one user turn: its chat template (which writes `<bos>` itself) and
        `Gemma3Processor`, which expands each `<start_of_image>` and gives the `token_type_ids` that make an
        image's tokens attend to each other."""
        from transformers import Gemma3ImageProcessorPil, Gemma3Processor

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        template = loaded.chat_template
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=template)  # fmt: skip
        spec = loaded.preprocessing
        image_processor = Gemma3ImageProcessorPil(
            size={"height": spec.crop_size, "width": spec.crop_size}, image_mean=list(spec.image_mean),
            image_std=list(spec.image_std), rescale_factor=spec.rescale_factor, do_pan_and_scan=False,
        )  # fmt: skip
        processor = Gemma3Processor(image_processor, loaded.tokenizer, image_seq_length=spec.token_range()[0])
        pictures = [load_image(image) for image in images] or None
        inputs = processor(text=text, images=pictures, add_special_tokens=False, return_tensors="pt")
        return {key: inputs[key] for key in ("input_ids", "pixel_values", "token_type_ids") if key in inputs}

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from .synthetic import build_gemma3

        return build_gemma3(out_dir, seed=seed)


FAMILY = Gemma3Family()

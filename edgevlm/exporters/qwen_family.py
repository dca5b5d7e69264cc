"""What the Qwen-VL families share on the export side: Qwen2-VL's interfaces, kept by its successors.

The vision tower + merger go to ONNX (`qwen_vit`), the language model to a `qwen2vl` GGUF (`qwen2vl_gguf`); the
base class here ties them to the manifest and gives transformers' inputs that parity checks compare a bundle
against. A family subclasses it and says how its tower is sized and which grids validate its graph; a successor
with another tower or language model names its graph wrapper (`vision_wrapper`), GGUF format (`llm_format`) and
position kind (`positions`).
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from pathlib import Path
from typing import Any

from ..contract.kinds.patch_positions import Grid2D
from ..contract.kinds.positions import MRope3D
from ..contract.kinds.preprocessing import DynamicPatches
from ..contract.manifest import TokenSpec, VisionSpec
from ..images import load_image
from .checkpoint import checkpoint_weights, load_model, vision_release
from .family import Family, Loaded, find_chat_template
from .onnx_export import vision_variants
from .qwen2vl_gguf import QWEN2VL_FORMAT, SPECIAL_TOKENS, QwenLLMFormat, special_token_ids, write_qwen2_vl_llm_gguf

logger = logging.getLogger(__name__)


class QwenVLFamily(Family):
    """A family with Qwen2-VL's interfaces; a subclass declares it (the first of its `architectures` is also the
    transformers class that loads a checkpoint) and sizes its tower."""

    llm_format: QwenLLMFormat = QWEN2VL_FORMAT
    vision_parts = ("model.visual",)  # the tower and its merger

    def load(self, model_dir: Path, *, vision_only: bool = False) -> Loaded:
        import transformers
        from transformers import AutoTokenizer

        # The language model stays in the checkpoint's dtype (or unloaded) and is converted tensor by tensor while
        # writing the GGUF; the vision tower is exported and validated in fp32.
        model_class = getattr(transformers, self.architectures[0])
        model = load_model(model_class, model_dir, self.vision_parts, vision_only=vision_only)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        preprocessor_config = model_dir / "preprocessor_config.json"
        config = json.loads(preprocessor_config.read_text()) if preprocessor_config.is_file() else {}
        return Loaded(
            model_dir=model_dir,
            model=model,
            tokenizer=tokenizer,
            preprocessing=DynamicPatches.from_preprocessor_config(config),
            chat_template=find_chat_template(tokenizer, model_dir),
            release_vision=vision_release(model, self.vision_parts, vision_only=vision_only),
        )

    def export_vision(self, loaded: Loaded, out_dir: Path, dtypes: tuple[str, ...]) -> VisionSpec:
        from .qwen_vit import export_qwen2_vl_vision

        vision_config = loaded.model.config.vision_config
        grids = self.validation_grids(vision_config)
        wrapper = self.vision_wrapper()
        report = export_qwen2_vl_vision(loaded.model, out_dir, dtypes=dtypes, grids=grids, wrapper=wrapper, release_torch=loaded.release_vision)  # fmt: skip
        # DeepStack (Qwen3-VL): each image row also carries one feature set per tapped tower layer
        deepstack_layers = len(getattr(vision_config, "deepstack_visual_indexes", None) or ())
        return VisionSpec(
            variants=vision_variants(report),
            default=dtypes[0],
            embedding_dim=int(loaded.model.config.text_config.hidden_size) * (1 + deepstack_layers),
            patch_positions=Grid2D(),
            deepstack_layers=deepstack_layers,
            **self.tower_sizes(vision_config),
        )

    def vision_wrapper(self) -> type:
        """The export-friendly forward of the tower (a `qwen_vit.Qwen2VLVisionForExport`)."""
        from .qwen_vit import Qwen2VLVisionForExport

        return Qwen2VLVisionForExport

    def validation_grids(self, vision_config: Any) -> tuple[tuple[int, int, int], ...]:
        """The (t, h, w) patch grids the exported graph is checked on against the PyTorch tower."""
        from .qwen_vit import DEFAULT_GRIDS

        return DEFAULT_GRIDS

    @abstractmethod
    def tower_sizes(self, vision_config: Any) -> dict:
        """The vision tower's sizes for `edgevlm plan`'s time and memory estimates (`VisionSpec` fields)."""

    def export_llm(self, loaded: Loaded, path: Path, dtype: str) -> dict:
        weights = checkpoint_weights(loaded.model, loaded.model_dir)
        return write_qwen2_vl_llm_gguf(loaded.model, loaded.tokenizer, path, dtype=dtype, chat_template=loaded.chat_template, llm_format=self.llm_format, weights=weights)  # fmt: skip

    def tokens(self, loaded: Loaded) -> TokenSpec:
        special_token_ids(loaded.tokenizer)  # the tokenizer has the family's special tokens, or a clear error
        return TokenSpec(image_pad=SPECIAL_TOKENS["image_pad"])

    def positions(self, loaded: Loaded) -> MRope3D:
        return MRope3D(merge_size=loaded.preprocessing.merge_size)

    # -- the transformers reference, for parity checks ------------------------------------------------------------
    def reference_inputs(self, loaded: Loaded, prompt: str, images: list[Any]) -> dict:
        """transformers' own inputs for one user turn: its chat template, image processor and M-RoPE inputs."""
        import torch
        from transformers import Qwen2VLImageProcessorPil

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=False,
            chat_template=loaded.chat_template,  # fmt: skip
        )
        inputs: dict = {}
        if images:
            processor = Qwen2VLImageProcessorPil(**_processor_kwargs(loaded.preprocessing))
            pixels = processor(images=[load_image(image) for image in images], return_tensors="pt")
            merge = loaded.preprocessing.merge_size**2
            pieces = text.split(SPECIAL_TOKENS["image_pad"])
            text = pieces[0] + "".join(
                SPECIAL_TOKENS["image_pad"] * int(grid.prod() // merge) + piece
                for grid, piece in zip(pixels["image_grid_thw"], pieces[1:], strict=True)
            )
            inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        input_ids = loaded.tokenizer(text, return_tensors="pt").input_ids
        image_pad_id = loaded.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image_pad"])
        inputs.update(input_ids=input_ids, mm_token_type_ids=(input_ids == image_pad_id).to(torch.int32))
        return inputs


def _processor_kwargs(spec: DynamicPatches) -> dict:
    return dict(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
        rescale_factor=spec.rescale_factor,
    )

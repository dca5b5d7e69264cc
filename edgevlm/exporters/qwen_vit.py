"""The Qwen-style ViT (Qwen2-VL's vision tower + patch merger, and its successors' with window attention) as ONE
ONNX graph that encodes one image of any size.

transformers' forward splits attention by `cu_seqlens` (one segment per image or frame) with `.tolist()`, which
freezes shapes or fails in `torch.onnx.export`. For one image that split is a no-op: attention is full over the
image's patches. `Qwen2VLVisionForExport` therefore reuses the Hugging Face submodules and weights (patch embed,
rotary `inv_freq`, each block's norms/qkv/proj/mlp, the merger) in a forward with no data-dependent shapes, and
computes the rotary angles in the graph from the patch coordinates the runtime passes in
(`edgevlm.contract.kinds.patch_positions.grid_patch_positions`).

A successor's tower may have RMSNorm and a gated MLP in its blocks (the wrapper calls the blocks' own norms and
MLPs) and window attention (`window_size` in its config) in all blocks but `fullatt_block_indexes`. transformers
reorders the patches window by window, attends within each window (`cu_window_seqlens`) and puts the merged tokens
back in order at the end; attention is order-free, so the graph keeps the patches in order and masks attention to
pairs of patches in the same window instead, computed in the graph from the patch positions: the graph's inputs and
the runtime are the same as Qwen2-VL's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.contract.graph import IMAGE_EMBEDS, PATCH_POSITIONS, PIXEL_PATCHES
from edgevlm.contract.kinds.patch_positions import grid_patch_positions
from edgevlm.exporters.onnx_export import OnnxExportSpec, check_vision_dtypes, export_vision_variants

logger = logging.getLogger(__name__)

VISION_EXPORT_SPEC = OnnxExportSpec(
    input_names=(PIXEL_PATCHES, PATCH_POSITIONS),
    output_names=(IMAGE_EMBEDS,),
    dynamic_axes={PIXEL_PATCHES: {0: "n_patches"}, PATCH_POSITIONS: {0: "n_patches"}},  # out: n_patches // merge²
    opset=18,
    atol=1e-4,
)

DEFAULT_GRIDS = ((1, 4, 6), (1, 8, 8), (1, 2, 16))


@dataclass(frozen=True)
class WindowAttention:
    """Window attention: blocks not in `full_blocks` attend only within square windows of `side` x `side` patches,
    tiled from the image's top-left corner (windows on the right and bottom edges may be smaller)."""

    side: int
    full_blocks: frozenset[int]

    @classmethod
    def of(cls, config) -> WindowAttention | None:
        """The window attention of a vision config; None for a tower whose blocks all attend to the whole image."""
        window_size = getattr(config, "window_size", None)
        if window_size is None:
            return None
        merge = config.spatial_merge_size
        side_tokens = window_size // merge // config.patch_size  # transformers' `vit_merger_window_size`
        if side_tokens < 1:
            raise ValueError(f"window_size {window_size} is smaller than one merged token ({merge} x {config.patch_size} pixels)")  # fmt: skip
        return cls(side=side_tokens * merge, full_blocks=frozenset(int(i) for i in config.fullatt_block_indexes))

    def mask(self, patch_positions: torch.Tensor) -> torch.Tensor:
        """(1, 1, n, n) bool: True where two patches (rows of `patch_positions`, (row, col)) share a window."""
        window = torch.div(patch_positions, self.side, rounding_mode="floor")
        return (window[:, None, :] == window[None, :, :]).all(dim=-1)[None, None]


def _split_linear(linear: nn.Linear, n: int) -> nn.ModuleList:
    """`linear` as `n` Linears, each computing one consecutive chunk of its outputs (copies of its weights)."""
    parts = nn.ModuleList()
    biases = linear.bias.chunk(n) if linear.bias is not None else [None] * n
    for weight, bias in zip(linear.weight.chunk(n), biases, strict=True):
        part = nn.Linear(linear.in_features, weight.shape[0], bias=bias is not None)
        part.weight.data.copy_(weight)
        if bias is not None:
            part.bias.data.copy_(bias)
        parts.append(part)
    return parts


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Qwen2VLVisionForExport(nn.Module):
    """`pixel_patches` (n, C*T*P*P) + `patch_positions` (n, 2) -> `image_embeds` (n / merge², hidden) for ONE image.

    Holds (does not copy) the Hugging Face `Qwen2VisionTransformerPretrainedModel`. A batch axis of 1 is kept
    through the blocks so every Linear exports as MatMul (which int8 quantization covers), not Gemm. A successor's
    tower overrides `embed_patches` (what enters the blocks) and `project` (what leaves the graph).
    """

    def __init__(self, visual: nn.Module, *, fused_attention: bool = False):
        """`fused_attention`: attention as onnxruntime's `com.microsoft.MultiHeadAttention` (one kernel, no n² score
        tensor in memory) instead of standard ONNX ops; onnxruntime-only, so only the CPU int8 variant uses it."""
        super().__init__()
        self.visual = visual
        self.fused_attention = fused_attention
        self.window = WindowAttention.of(visual.config)
        # onnxruntime's kernels take query, key and value as three tensors: three MatMuls write them where one
        # MatMul and a Split would copy them (the 2B tower runs 3-5% faster so, same outputs; weights are copied)
        self.qkv_parts = nn.ModuleList(_split_linear(block.attn.qkv, 3) for block in visual.blocks) if fused_attention else None  # fmt: skip

    def forward(self, pixel_patches: torch.Tensor, patch_positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_patches(pixel_patches, patch_positions)
        return self.project(self.block_states(hidden, patch_positions))

    def embed_patches(self, pixel_patches: torch.Tensor, patch_positions: torch.Tensor) -> torch.Tensor:
        """(1, n, embed): the patch embedding. The Conv3d whose kernel is one whole patch is a MatMul on the
        flattened patch, which onnxruntime runs ~10x faster than its 5-D Conv (and which stays float: it reads raw
        pixels)."""
        proj = self.visual.patch_embed.proj
        hidden = (pixel_patches @ proj.weight.reshape(proj.out_channels, -1).T)[None]
        return hidden + proj.bias if proj.bias is not None else hidden

    def block_states(self, hidden: torch.Tensor, patch_positions: torch.Tensor) -> list[torch.Tensor]:
        """The hidden states (1, n, embed) after each block of the tower."""
        visual = self.visual
        n_patches = hidden.shape[1]
        # Axial rope: angles of the row then the column over head_dim / 2, repeated to rotate the whole head.
        half_angles = (patch_positions.float()[..., None] * visual.rotary_pos_emb.inv_freq).flatten(1)  # (n, hd/2)
        if self.fused_attention:  # the kernel's form: patch i takes row i of the half-head cos/sin tables
            rope = (torch.arange(n_patches)[None], half_angles.cos(), half_angles.sin())
        else:
            angles = torch.cat([half_angles, half_angles], dim=-1)[None, None]  # (1, 1, n, head_dim)
            cos, sin = angles.cos(), angles.sin()
        window_mask = None if self.window is None else self.window.mask(patch_positions)
        if window_mask is not None and self.fused_attention:  # the kernel adds a bias where SDPA takes a bool mask
            window_mask = torch.where(window_mask, torch.zeros(()), torch.full((), float("-inf")))
        states = []
        for index, block in enumerate(visual.blocks):
            attn = block.attn
            mask = None if self.window is None or index in self.window.full_blocks else window_mask
            if self.fused_attention:
                normed = block.norm1(hidden)
                query, key, value = (part(normed) for part in self.qkv_parts[index])
                out = self._fused_attention(attn, query, key, value, *rope, attention_bias=mask)
            else:
                qkv = attn.qkv(block.norm1(hidden)).reshape(1, n_patches, 3, attn.num_heads, attn.head_dim)
                query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (1, heads, n, head_dim)
                query = query * cos + _rotate_half(query) * sin
                key = key * cos + _rotate_half(key) * sin
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling)
                out = out.transpose(1, 2)
            hidden = hidden + attn.proj(out.reshape(1, n_patches, -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
            states.append(hidden)
        return states

    def project(self, states: list[torch.Tensor]) -> torch.Tensor:
        """`image_embeds` from the blocks' states: the merger on the last one."""
        merger = self.visual.merger
        merged = merger.ln_q(states[-1]).reshape(1, -1, merger.hidden_size)  # merge² neighbouring patches per token
        return merger.mlp(merged)[0]

    @staticmethod
    def _fused_attention(
        attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """(1, n, heads * head_dim) attention output of `query`, `key` and `value`, each (1, n, heads * head_dim), in
        onnxruntime's kernels: rope on query and key by `RotaryEmbedding`, then `MultiHeadAttention`; both read the
        (1, n, hidden) layout, so nothing is transposed, and the rope takes one pass instead of six elementwise ops.
        `attention_bias` (1, 1, n, n), added to the scores, is -inf where a patch may not attend (window attention)."""
        shape = (1, query.shape[1], attn.num_heads * attn.head_dim)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            return torch.onnx.ops.symbolic("com.microsoft::RotaryEmbedding", [x, position_ids, cos, sin], attrs={},
                                           dtype=x.dtype, shape=shape, version=1)  # fmt: skip

        inputs = [rotate(query), rotate(key), value]
        if attention_bias is not None:  # inputs 3 and 4 (bias, key_padding_mask) unused
            inputs += [None, None, attention_bias]
        return torch.onnx.ops.symbolic(
            "com.microsoft::MultiHeadAttention", inputs,
            attrs={"num_heads": attn.num_heads, "scale": float(attn.scaling)}, dtype=query.dtype, shape=shape,
            version=1,
        )  # fmt: skip


class _HFVisionReference:
    """The Hugging Face forward on the same inputs: what the language model receives in transformers.

    It takes the graph's inputs; the grid is recovered from the patch positions (one full image, t = 1).
    """

    def __init__(self, visual: nn.Module):
        self.visual = visual

    def __call__(self, pixel_patches: torch.Tensor, patch_positions: torch.Tensor) -> torch.Tensor:
        h, w = (int(x) + 1 for x in patch_positions.max(dim=0).values)
        grid_thw = torch.tensor([[pixel_patches.shape[0] // (h * w), h, w]])
        return vision_features(self.visual(pixel_patches, grid_thw=grid_thw))


def vision_features(output) -> torch.Tensor:
    """What the language model receives from a Hugging Face vision forward's output: the merged tokens, then each
    DeepStack feature set (Qwen3-VL) in the tower's layer order, side by side in each row."""
    return torch.cat([output.pooler_output, *(getattr(output, "deepstack_features", None) or [])], dim=-1)


def find_visual(hf_model: nn.Module) -> nn.Module:
    """The vision tower of a `Qwen2VLForConditionalGeneration`, a `Qwen2VLModel`, or the tower itself."""
    inner_model = getattr(hf_model, "model", None)
    for candidate in (hf_model, getattr(hf_model, "visual", None), getattr(inner_model, "visual", None)):
        if candidate is not None and hasattr(candidate, "patch_embed") and hasattr(candidate, "merger"):
            return candidate
    raise ValueError(f"{type(hf_model).__name__} has no Qwen2-VL vision tower (expected .model.visual or .visual)")


def vision_sample_inputs(visual: nn.Module, grid: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random normalized pixel patches for `grid` and their positions, as graph inputs."""
    config = visual.config
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    n_patches = grid[0] * grid[1] * grid[2]
    generator = torch.Generator().manual_seed(seed)
    pixel_patches = torch.randn(n_patches, patch_dim, generator=generator)
    positions = torch.from_numpy(grid_patch_positions(grid, config.spatial_merge_size))
    return pixel_patches, positions


def _check_export_args(visual: nn.Module, dtypes: Sequence[str], grids: Sequence[tuple[int, int, int]]) -> None:
    check_vision_dtypes(dtypes)
    merge = visual.config.spatial_merge_size
    for grid in grids:
        if len(grid) != 3 or grid[0] != 1 or grid[1] % merge or grid[2] % merge or min(grid) < 1:
            raise ValueError(f"validation grid {tuple(grid)} must be (1, h, w) with h and w multiples of {merge}")
    if len({grid[1] * grid[2] for grid in grids}) < 2:
        raise ValueError(f"validate on at least 2 grids of different sizes (one graph serves all), got {list(grids)}")
    dtype = next(visual.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(
            f"the vision tower has {dtype} weights; export needs float32: load the model with dtype=torch.float32"
        )


def export_qwen2_vl_vision(
    hf_model: nn.Module,
    out_dir: str | Path,
    *,
    dtypes: Sequence[str] = ("fp32",),
    grids: Sequence[tuple[int, int, int]] = DEFAULT_GRIDS,
    progress: Callable[[str], None] | None = None,
    release_torch: Callable[[], None] | None = None,
    wrapper: type[Qwen2VLVisionForExport] = Qwen2VLVisionForExport,
) -> dict:
    """Write `vision.onnx` (and `vision-int8.onnx` / `vision-fp16.onnx` when in `dtypes`) to `out_dir`, validated.

    fp32 is checked against the Hugging Face vision forward on every grid; the variants as
    `onnx_export.export_vision_variants` makes them. Returns the manifest entry per dtype. `progress` is called
    with a short description before each long step. `wrapper` is the export-friendly forward of the family's tower.
    """
    visual = find_visual(hf_model)
    _check_export_args(visual, dtypes, grids)
    input_sets = [vision_sample_inputs(visual, tuple(grid), seed=i) for i, grid in enumerate(grids)]
    return export_vision_variants(
        lambda fused: wrapper(visual, fused_attention=fused).eval(), VISION_EXPORT_SPEC,
        _HFVisionReference(visual), input_sets, out_dir, dtypes,
        fp32_report={"grids": [list(grid) for grid in grids]}, progress=progress, release_torch=release_torch,
    )  # fmt: skip


__all__ = [
    "VISION_EXPORT_SPEC",
    "Qwen2VLVisionForExport",
    "WindowAttention",
    "export_qwen2_vl_vision",
    "find_visual",
    "vision_features",
    "vision_sample_inputs",
]  # fmt: skip

"""The one entry point for planning image spans of a loaded (or about to be loaded) bundle.

`Planner` holds what planning needs besides a request: the manifest's preprocessing strategy and tower sizes, the
token-limit layers below the request (cli > profile > bundle, `budget.resolve_limits`) and the context size.
`EdgeVLM` plans every request with it, `edgevlm plan` plans without loading a model, and the profile resolver asks
it for the token range a vision provider must be built for. Pure: no llama.cpp, no onnxruntime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .budget import (  # fmt: skip
    BudgetLimits,
    BudgetPlan,
    ImageRequest,
    ResolvedLimits,
    VisionTowerSize,
    count_spans,
    model_token_range,
    plan_images,
    resolve_limits,
    vision_tower_size,
    within_model_range,
)
from .contract.kinds.tiling import TiledPreprocessing
from .tile_budget import CountText, count_tiled_spans, plan_tiled

if TYPE_CHECKING:
    from .contract.kinds.tiling import Preprocessing
    from .contract.manifest import Manifest
    from .profiles import RuntimeSettings


@dataclass(frozen=True)
class Planner:
    preprocessing: Preprocessing
    bundle_limits: BudgetLimits
    cli_limits: BudgetLimits = field(default_factory=BudgetLimits)
    profile_limits: BudgetLimits | None = None
    n_ctx: int | None = None  # None: plan without a context (the images get what the limits allow)
    tower: VisionTowerSize | None = None  # None: no memory/time estimates

    @classmethod
    def for_settings(cls, manifest: Manifest, settings: RuntimeSettings, cli_limits: BudgetLimits | None = None) -> Planner:  # fmt: skip
        """The planner of a bundle loaded with resolved `settings` (the profile's limits, context and vision
        precision) and the caller's `cli_limits`."""
        return cls.for_bundle(manifest, cli_limits, settings.limits, n_ctx=settings.llama.n_ctx, vision_dtype=settings.vision_dtype)  # fmt: skip

    @classmethod
    def for_bundle(cls, manifest: Manifest, cli_limits: BudgetLimits | None = None,
                   profile_limits: BudgetLimits | None = None, *, n_ctx: int | None = None,
                   vision_dtype: str | None = None) -> Planner:  # fmt: skip
        """The planner of a bundle loaded with these limits; contradicting limits raise `BudgetError` here, before
        anything is loaded."""
        planner = cls(manifest.preprocessing, manifest.budget, cli_limits or BudgetLimits(), profile_limits, n_ctx,
                      vision_tower_size(manifest, vision_dtype))  # fmt: skip
        planner.limits()
        return planner

    def with_context(self, n_ctx: int) -> Planner:
        return dataclasses.replace(self, n_ctx=n_ctx)

    def layered_limits(self, request: BudgetLimits | None = None) -> ResolvedLimits:
        """The limits of the layers, merged limit by limit (request > cli > profile > bundle)."""
        return resolve_limits(request=request, cli=self.cli_limits, profile=self.profile_limits, bundle=self.bundle_limits)  # fmt: skip

    def limits(self, request: BudgetLimits | None = None) -> ResolvedLimits:
        """The limits the planner applies to a request: `layered_limits` with the profile's and bundle's moved into
        the model's own range; `BudgetError` when they contradict each other or the model."""
        return within_model_range(self.layered_limits(request), self.preprocessing)

    def token_range(self) -> tuple[int, int]:
        """The fewest and most tokens an image span may get before any request (which can still change them)."""
        in_force = self.limits()
        model_min, model_max = model_token_range(self.preprocessing)
        high = min(in_force.max_image_tokens or model_max, model_max)
        return min(max(in_force.min_image_tokens or model_min, model_min), high), high

    @property
    def tiled(self) -> bool:
        """Whether the model tiles images itself (a tiling kind: the limits choose each image's tile grid)."""
        return isinstance(self.preprocessing, TiledPreprocessing)

    def count_spans(self, requests: Sequence[ImageRequest]) -> int:
        """Image placeholders the prompt needs for `requests`: one per image span (global views and tiles), or one
        per image for a tiling model (the runtime writes the image's layout of views and text in its place)."""
        return count_tiled_spans(requests) if self.tiled else count_spans(requests, self.preprocessing)

    def plan(self, requests: Sequence[ImageRequest], request: BudgetLimits | None = None, *,
             n_prompt_tokens: int = 0, max_new_tokens: int = 0, count_text: CountText | None = None) -> BudgetPlan:  # fmt: skip
        """The spans of one request's images (see `budget.plan_images`, `tile_budget.plan_tiled`); `count_text`
        counts the tokens of the text a tiling model writes between views (None: not counted)."""
        limits = self.limits(request)
        if self.tiled:
            return plan_tiled(requests, self.preprocessing, limits, n_ctx=self.n_ctx, n_prompt_tokens=n_prompt_tokens,
                              max_new_tokens=max_new_tokens, tower=self.tower, count_text=count_text)  # fmt: skip
        return plan_images(requests, self.preprocessing, limits, n_ctx=self.n_ctx,
                           n_prompt_tokens=n_prompt_tokens, max_new_tokens=max_new_tokens, tower=self.tower)  # fmt: skip

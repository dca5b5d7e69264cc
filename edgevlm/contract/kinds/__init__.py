"""What each manifest kind means: one class per kind (see `registry`), run by the runtime; importing this package
registers them.

A family that reuses these mechanisms adds no runtime code; one that needs a new mechanism adds one class to the
module of its section, registered under a new kind.
"""

from . import patch_positions, positions, preprocessing, tiles_anyres, tiles_idefics3, tiles_internvl, tiling  # noqa: F401  (each module registers its kinds)
from .registry import known_kinds, strategy_class, strategy_from_dict

__all__ = ["known_kinds", "strategy_class", "strategy_from_dict"]

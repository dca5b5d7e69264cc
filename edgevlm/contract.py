"""The contract between the exporter and the runtime: the names both sides use for a bundle's parts.

The vision graph's inputs and output are named here; the manifest's typed sections and the kinds this edgevlm
knows live here too (see `Manifest`).
"""

from __future__ import annotations

# The vision graph encodes ONE image: `pixel_patches` float32 (n_patches, C*T*P*P) -> `image_embeds` float32
# (n_patches / merge², hidden); a `grid-2d` graph also takes `patch_positions` int64 (n_patches, 2) = (row, col).
PIXEL_PATCHES, PATCH_POSITIONS, IMAGE_EMBEDS = "pixel_patches", "patch_positions", "image_embeds"

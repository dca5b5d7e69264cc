"""The vision graph's inputs and output, by name: exporters write graphs with them, the runtime feeds them.

A graph encodes ONE image: `pixel_patches` float32 (n_patches, C*T*P*P) -> `image_embeds` float32
(n_patches / merge², hidden); a graph whose manifest says `grid-2d` patch positions also takes `patch_positions`
int64 (n_patches, 2) = (row, col) of each patch.
"""

PIXEL_PATCHES, PATCH_POSITIONS, IMAGE_EMBEDS = "pixel_patches", "patch_positions", "image_embeds"

"""The vision graph's inputs and output, by name: exporters write graphs with them, the runtime feeds them.

A graph encodes ONE image: `pixel_patches` float32 (n_patches, C*T*P*P) -> `image_embeds` float32
(n_patches / merge², hidden); a graph whose manifest says `grid-2d` patch positions also takes `patch_positions`
int64 (n_patches, 2) = (row, col) of each patch; one whose manifest says `packed-tokens` (AnyRes) takes the images of
one view and `token_sources` int64 (n_tokens, 4), `token_weights` float32 (n_tokens, 4): each output row is the
weighted sum of those rows of [the images' patch features; a learned row] (`edgevlm.contract.kinds.tiles_anyres`).
"""

PIXEL_PATCHES, PATCH_POSITIONS, IMAGE_EMBEDS = "pixel_patches", "patch_positions", "image_embeds"
TOKEN_SOURCES, TOKEN_WEIGHTS = "token_sources", "token_weights"

"""LLaVA-NeXT's any-resolution geometry: which tiles an image is cut into and where each visual token comes from.

An image of ``height`` x ``width`` pixels is scaled to the best-fitting ``image_grid_pinpoints`` resolution and
cut into ``image_size`` tiles; the vision tower sees the whole image resized to one tile (the *base* image)
plus every tile. The decoder then takes the base image's patches, and the tile grid's patches row by row with
the padding rows or columns removed (``unpad``) and one ``image_newline`` token after each row. These are
HuggingFace's rules (``LlavaNextForConditionalGeneration.pack_image_features`` and the processor's count);
the tests hold this module to both.

This module imports nothing but the standard library at module level: ``prune-export deploy`` copies it next
to the Triton orchestrator model (``NAME/1/prune_export_anyres.py``), where prune-export is not installed, so
a served any-resolution prompt is packed by the same code as ``prune-export run`` packs it.
:func:`pack` takes numpy arrays (numpy is imported when it is called).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def best_resolution(height: int, width: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (height, width) pinpoint LLaVA-NeXT tiles an image at: the one that keeps the most of the image's
    pixels when it is scaled to fit, then the one that wastes the fewest (HuggingFace's rule)."""
    best, best_kept, best_waste = None, -1, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (h, w), kept, waste
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


@dataclass(frozen=True)
class Tiling:
    """The tiling of one any-resolution model: its tile side and patch side in pixels and its pinpoints."""

    image_size: int
    patch_size: int
    pinpoints: tuple[tuple[int, int], ...]

    @property
    def side(self) -> int:
        """Patches along one side of a tile."""
        return self.image_size // self.patch_size

    @property
    def tile_tokens(self) -> int:
        """Patches of one tile (the base image gives as many visual tokens)."""
        return self.side * self.side

    @property
    def max_tiles(self) -> int:
        """Tower inputs of the largest image: the base image plus the tiles of the largest pinpoint."""
        return 1 + max((h // self.image_size) * (w // self.image_size) for h, w in self.pinpoints)

    def tiles_for(self, height: int, width: int) -> int:
        """Tower inputs (base image + tiles) of an image of ``height`` x ``width`` pixels."""
        best_h, best_w = best_resolution(height, width, self.pinpoints)
        return 1 + (best_h // self.image_size) * (best_w // self.image_size)

    def unpadded_grid(self, height: int, width: int) -> tuple[int, int, int, int, int]:
        """An image's patch grid: ``(grid_cols, row0, row1, col0, col1)``, the tiles per grid row and the rows
        and columns left once the padding is removed, as HuggingFace's ``unpad_image`` keeps them."""
        best_h, best_w = best_resolution(height, width, self.pinpoints)
        grid_cols = best_w // self.image_size
        rows, cols = self.side * (best_h // self.image_size), self.side * grid_cols
        if width / height > cols / rows:
            pad = (rows - int(round(height * (cols / width), 7))) // 2
            return grid_cols, pad, rows - pad, 0, cols
        pad = (cols - int(round(width * (rows / height), 7))) // 2
        return grid_cols, 0, rows, pad, cols - pad

    def visual_tokens_for(self, height: int, width: int) -> int:
        """Visual tokens of an image: the base image's tile, the unpadded grid and one newline per grid row."""
        _, row0, row1, col0, col1 = self.unpadded_grid(height, width)
        rows, cols = row1 - row0, col1 - col0
        return self.tile_tokens + rows * cols + rows

    def pack_index(self, height: int, width: int) -> list[int]:
        """Where each visual token of an image comes from: an index into the tower's per-tile patches
        flattened to ``[tiles * patches]`` (tile 0 is the base image), or -1 for an ``image_newline`` token.
        The base image's patches first, then the tile grid row by row with its padding removed, a newline
        after each row; its length is :meth:`visual_tokens_for`."""
        side, patches = self.side, self.tile_tokens
        grid_cols, row0, row1, col0, col1 = self.unpadded_grid(height, width)
        index = list(range(patches))
        for r in range(row0, row1):
            for c in range(col0, col1):
                tile = 1 + (r // side) * grid_cols + c // side
                index.append(tile * patches + (r % side) * side + c % side)
            index.append(-1)
        return index


def pack(index: list[int], features: Any, cls_attention: Any, newline: Any) -> tuple[Any, Any]:
    """The vision graph's per-tile outputs packed into one image's visual tokens by ``index``
    (:meth:`Tiling.pack_index`): ``image_features [1, V, d]`` with ``newline`` at every -1, and
    ``cls_attention [1, V]`` with 0 there (a newline token has no [CLS] attention)."""
    import numpy as np

    where = np.asarray(index, dtype=np.int64)
    flat = features.reshape(-1, features.shape[-1])
    rows = np.concatenate([flat, newline.reshape(1, -1).astype(flat.dtype)])[np.where(where < 0, flat.shape[0], where)]
    scores = cls_attention.reshape(-1)
    scores = np.concatenate([scores, np.zeros(1, scores.dtype)])[np.where(where < 0, scores.size, where)]
    return rows[None], scores[None]

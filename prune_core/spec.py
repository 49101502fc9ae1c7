"""What the cost model and the plan need to know about a model: its architecture, read from config only.

A :class:`ModelSpec` is built by a model adapter from ``config.json`` (no weights needed), so a user can
size LLaVA-1.5-7B/13B from a folder that holds only the config. Its :meth:`ModelSpec.fingerprint` ties a
plan to the architecture it was searched on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from fractions import Fraction

from .anyres import Tiling
from .ops import Group

#: LLaVA-1.5 (vicuna_v1 template): tokens before the image, and a typical question + answer prompt.
DEFAULT_SYS_TOKENS = 35
DEFAULT_TXT_TOKENS = 100
#: GSOP's key tokens: the top quarter of the visual tokens by [CLS] attention (144 of 576).
DEFAULT_KEY_FRACTION = 0.25


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of a VLM decoder and its vision tower (all integers from the config)."""

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    visual_tokens: int
    image_size: int
    patch_size: int
    vision_layers: int
    vision_hidden_size: int
    #: Any-resolution models (LLaVA-NeXT): the (height, width) resolutions an image is tiled at. None: one
    #: fixed-size image (LLaVA-1.5), ``visual_tokens`` per prompt. With it, ``visual_tokens`` is the largest
    #: count an image can give (the plan's reference layout) and :meth:`visual_tokens_for` a given image's.
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.image_grid_pinpoints is not None:  # JSON gives lists; keep the spec hashable and comparable
            pins = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
            object.__setattr__(self, "image_grid_pinpoints", pins)

    @property
    def any_resolution(self) -> bool:
        """Whether the visual token count depends on the image size (LLaVA-NeXT's tiling)."""
        return self.image_grid_pinpoints is not None

    @property
    def tiling(self) -> Tiling | None:
        """Any-resolution models: their tiling geometry (:class:`prune_core.anyres.Tiling`); else None."""
        if self.image_grid_pinpoints is None:
            return None
        return Tiling(self.image_size, self.patch_size, self.image_grid_pinpoints)

    @property
    def tile_tokens(self) -> int:
        """Visual tokens of one image tile (LLaVA-NeXT's base image, or LLaVA-1.5's whole image)."""
        return self.tiling.tile_tokens if self.tiling else self.visual_tokens

    @property
    def max_tiles(self) -> int:
        """Tower inputs of the largest image: the base image plus the tiles of the largest pinpoint (1 for
        fixed-size models)."""
        return self.tiling.max_tiles if self.tiling else 1

    def tiles_for(self, height: int, width: int) -> int:
        """Tower inputs (base image + tiles) of an image of ``height`` x ``width`` pixels."""
        return self.tiling.tiles_for(height, width) if self.tiling else 1

    def pack_index(self, height: int, width: int) -> list[int]:
        """Where each visual token of an image of ``height`` x ``width`` comes from, as LLaVA-NeXT packs them
        (:meth:`prune_core.anyres.Tiling.pack_index`: an index into the tower's per-tile patches, -1 for an
        ``image_newline`` token); fixed-size models: every patch in order."""
        return self.tiling.pack_index(height, width) if self.tiling else list(range(self.visual_tokens))

    @property
    def reference_image(self) -> tuple[int, int] | None:
        """Any-resolution models: the (height, width) of an image that gives ``visual_tokens``, the most."""
        if not self.any_resolution:
            return None
        return max(self.image_grid_pinpoints or (), key=lambda p: self.visual_tokens_for(*p))

    def visual_tokens_for(self, height: int, width: int) -> int:
        """Visual tokens of an image of ``height`` x ``width`` pixels (LLaVA-1.5: always ``visual_tokens``).

        LLaVA-NeXT: the base image's tile, plus the grid of the best-fitting pinpoint with its padding rows
        or columns removed (``unpad``), plus one ``image_newline`` token per remaining row, as HuggingFace's
        processor counts them.
        """
        return self.tiling.visual_tokens_for(height, width) if self.tiling else self.visual_tokens

    @property
    def q_dim(self) -> int:
        """Width of the query (and attention output) projection: heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the K and V projections: kv_heads x head_dim (smaller than q_dim under GQA)."""
        return self.num_kv_heads * self.head_dim

    def key_tokens(self, fraction: float = DEFAULT_KEY_FRACTION, visual: int | None = None) -> int:
        """Number of ``img_key`` tokens among ``visual`` visual tokens (default: the model's
        ``visual_tokens``): :func:`key_count`."""
        return key_count(fraction, self.visual_tokens if visual is None else visual)

    def fingerprint(self) -> str:
        """A stable hash of the architecture; plans refuse to run on a model with another one."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict[str, object]:
        """The fields; optional ones (any-resolution) only when set, so LLaVA-1.5 specs, fingerprints and plans
        read the same as before they existed."""
        data = asdict(self)
        if data["image_grid_pinpoints"] is None:
            del data["image_grid_pinpoints"]
        else:
            data["image_grid_pinpoints"] = [list(p) for p in data["image_grid_pinpoints"]]
        return data


def key_ratio(fraction: float) -> tuple[int, int]:
    """The key fraction as a ratio ``(p, q)`` of integers (``0.25`` is ``(1, 4)``)."""
    ratio = Fraction(fraction).limit_denominator(10**6)
    return ratio.numerator, ratio.denominator


def key_count(fraction: float, visual: int) -> int:
    """``img_key`` tokens among ``visual`` visual tokens: ``fraction * visual`` rounded half up, in [1, visual].

    Computed in integers from :func:`key_ratio`, ``(2 p V + q) // 2 q``, so that a graph whose visual count is
    only known at run time (LLaVA-NeXT) computes the same count with integer ops as the executor does here.
    """
    p, q = key_ratio(fraction)
    return max(1, min(visual, (2 * p * visual + q) // (2 * q)))


@dataclass(frozen=True)
class GroupSizes:
    """Token counts of the four groups of one prompt."""

    sys: int
    img_key: int
    img_rest: int
    txt: int

    @classmethod
    def for_prompt(
        cls, spec: ModelSpec, sys_tokens: int, txt_tokens: int, key_fraction: float = DEFAULT_KEY_FRACTION,
        visual: int | None = None,
    ) -> GroupSizes:
        """A prompt's groups; ``visual``: its visual tokens (default the model's ``visual_tokens``, which for
        an any-resolution model is the largest image's)."""
        n = spec.visual_tokens if visual is None else visual
        key = spec.key_tokens(key_fraction, n)
        return cls(sys=sys_tokens, img_key=key, img_rest=n - key, txt=txt_tokens)

    @classmethod
    def default(cls, spec: ModelSpec, txt_tokens: int = DEFAULT_TXT_TOKENS) -> GroupSizes:
        """LLaVA-1.5's reference prompt: 35 system tokens, all visual tokens, ``txt_tokens`` text tokens."""
        return cls.for_prompt(spec, DEFAULT_SYS_TOKENS, txt_tokens)

    def __getitem__(self, group: Group) -> int:
        return int(getattr(self, Group(group).value))

    @property
    def total(self) -> int:
        return self.sys + self.img_key + self.img_rest + self.txt

    def as_dict(self) -> dict[str, int]:
        return {g.value: self[g] for g in (Group.SYS, Group.IMG_KEY, Group.IMG_REST, Group.TXT)}

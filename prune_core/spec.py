"""What the cost model and the plan need to know about a model: its architecture, read from config only.

A :class:`ModelSpec` is built by a model adapter from ``config.json`` (no weights needed), so a user can
size LLaVA-1.5-7B/13B from a folder that holds only the config. Its :meth:`ModelSpec.fingerprint` ties a
plan to the architecture it was searched on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

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

    @property
    def q_dim(self) -> int:
        """Width of the query (and attention output) projection: heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the K and V projections: kv_heads x head_dim (smaller than q_dim under GQA)."""
        return self.num_kv_heads * self.head_dim

    def key_tokens(self, fraction: float = DEFAULT_KEY_FRACTION) -> int:
        """Number of ``img_key`` tokens: ``round(fraction * visual_tokens)``, at least 1."""
        return max(1, min(self.visual_tokens, round(fraction * self.visual_tokens)))

    def fingerprint(self) -> str:
        """A stable hash of the architecture; plans refuse to run on a model with another one."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class GroupSizes:
    """Token counts of the four groups of one prompt."""

    sys: int
    img_key: int
    img_rest: int
    txt: int

    @classmethod
    def for_prompt(
        cls, spec: ModelSpec, sys_tokens: int, txt_tokens: int, key_fraction: float = DEFAULT_KEY_FRACTION
    ) -> GroupSizes:
        key = spec.key_tokens(key_fraction)
        return cls(sys=sys_tokens, img_key=key, img_rest=spec.visual_tokens - key, txt=txt_tokens)

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

"""The contract between prune-export and one VLM family.

An adapter turns a local HuggingFace folder into what the executor and exporter need, and nothing more:
the architecture (:class:`~prune_core.spec.ModelSpec`, from the config alone), the prompt and its token
layout, the vision features with the vision tower's [CLS]->patch attention, the token embeddings, the
decoder layers' parts, RoPE, the final norm and the LM head. Adding a family (LLaVA-NeXT, Qwen2-VL) means
one more adapter file registered in :mod:`exporter.adapters`; see docs/adapters.md.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prune_core.errors import ModelLoadError
from prune_core.spec import ModelSpec


@dataclass(frozen=True)
class LayerParts:
    """The modules of one pre-norm decoder layer, as the executor calls them.

    Linear layers may carry biases (Qwen2 does on Q/K/V); the executor calls them as modules.
    """

    attn_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    mlp_norm: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


@dataclass(frozen=True)
class VisionOutput:
    """Projected visual tokens and the vision tower's [CLS]->patch attention, one row per image."""

    features: torch.Tensor  # [batch, visual_tokens, hidden]
    cls_attention: torch.Tensor  # [batch, visual_tokens], mean over heads of the feature layer


@dataclass(frozen=True)
class PromptTokens:
    """A tokenised prompt with one image: ids, the image span and the preprocessed pixels."""

    input_ids: torch.Tensor  # [n] int64, the image span filled with the image token id
    image_start: int
    image_end: int  # exclusive
    pixel_values: torch.Tensor  # [1, 3, H, W]; any-resolution models: [1, tiles, 3, H, W]
    image_sizes: torch.Tensor | None = None  # any-resolution models: [1, 2] (height, width) of the image


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read ``config.json`` of a model folder with errors a user can act on."""
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist; pass a local HuggingFace model folder")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file, not a model folder; pass the folder that holds config.json")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json, so it is not a HuggingFace model folder "
            "(create one with 'prune-export demo-model' or point at a downloaded LLaVA folder)"
        )
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{cfg} does not hold a JSON object")
    return data


class VLMAdapter(ABC):
    """One loaded VLM. Subclasses implement a family; instances are built by :meth:`load`."""

    #: ``config.json`` ``model_type`` values this adapter handles.
    model_types: ClassVar[tuple[str, ...]] = ()

    spec: ModelSpec
    model: nn.Module
    dtype: torch.dtype
    device: torch.device

    # -- config only -----------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def spec_from_config(cls, folder: Path, config: dict[str, Any]) -> ModelSpec:
        """The architecture, from ``config.json`` alone (no weights, no tokenizer)."""

    @classmethod
    def sys_tokens_from_folder(cls, folder: Path) -> int | None:
        """Tokens before the image in this family's default prompt, if a tokenizer is in the folder."""
        return None

    # -- loaded model ----------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> VLMAdapter:
        """Load weights, tokenizer and image processor from a local folder (never from a hub)."""

    @abstractmethod
    def prompt_text(self, question: str) -> str:
        """The full prompt for one image and a question, ending where the answer starts."""

    @abstractmethod
    def tokenize(self, image: Any, question: str) -> PromptTokens:
        """Preprocess one PIL image and a question into :class:`PromptTokens`."""

    @abstractmethod
    def vision(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisionOutput:
        """Run the vision tower and projector on a batch of images (``image_sizes``: any-resolution models'
        original (height, width) per image, which decides their tiling)."""

    def vision_tiles(self, pixel_values: torch.Tensor) -> VisionOutput:
        """Any-resolution families: features and [CLS] attention per tower input (base image or tile), before
        they are packed into one image's visual tokens."""
        raise NotImplementedError(f"{type(self).__name__} takes fixed-size images; use vision()")

    @abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[n, hidden]`` of ``[n]`` ids."""

    @property
    @abstractmethod
    def layers(self) -> Sequence[LayerParts]:
        """The decoder layers, in order."""

    @abstractmethod
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``[n, head_dim]`` for integer ``positions`` ``[n]``."""

    @abstractmethod
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's last norm."""

    @abstractmethod
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end a generated answer."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Detokenise generated ids."""

    #: Token id that the processor repeats once per visual token in the prompt.
    image_token_id: int

    def save_preprocessing(self, folder: Path) -> None:
        """Write the tokenizer and image processor (``save_pretrained`` files) into ``folder``, so that a
        build answers questions without the model folder."""
        raise NotImplementedError(f"{type(self).__name__} cannot save its tokenizer and image processor")

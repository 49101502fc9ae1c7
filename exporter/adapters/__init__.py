"""Model adapters, registered by the ``model_type`` of ``config.json``.

To add a family, write one adapter file (a :class:`~exporter.adapters.base.VLMAdapter` subclass) and add
it to :data:`ADAPTERS`; see docs/adapters.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prune_core.errors import ModelLoadError
from prune_core.spec import ModelSpec

from .base import LayerParts, PromptTokens, VisionOutput, VLMAdapter, read_config_json
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter

ADAPTERS: tuple[type[VLMAdapter], ...] = (LlavaAdapter, LlavaNextAdapter)

__all__ = [
    "ADAPTERS",
    "LayerParts",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "PromptTokens",
    "VLMAdapter",
    "VisionOutput",
    "adapter_class",
    "load_adapter",
    "load_spec",
]


def adapter_class(folder: str | Path) -> type[VLMAdapter]:
    """The adapter for a model folder, chosen by ``model_type`` in its ``config.json``."""
    config = read_config_json(folder)
    model_type = config.get("model_type")
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise ModelLoadError(
        f"{folder}: model_type {model_type!r} is not supported (known: {', '.join(known)}); "
        "prune-export works on LLaVA-1.5 (llava) and LLaVA-NeXT (llava_next) folders"
    )


def load_spec(folder: str | Path) -> ModelSpec:
    """The architecture of a model folder from its ``config.json`` alone."""
    folder = Path(folder)
    cls = adapter_class(folder)
    return cls.spec_from_config(folder, read_config_json(folder))


def load_adapter(folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> VLMAdapter:
    """Load a model folder with its adapter (local files only)."""
    folder = Path(folder)
    return adapter_class(folder).load(folder, dtype=dtype, device=device)

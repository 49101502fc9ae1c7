"""Model workflows: demo models and data, and what a model folder's config says (``info``,
``autoprune-schedule``). ``info`` and ``autoprune-schedule`` need only config.json (plus the tokenizer, when
there is one, for the number of system tokens)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prune_core.autoprune import ScheduleTable, solve_scale
from prune_core.cost import prefill_flops
from prune_core.errors import PlanError
from prune_core.ops import GROUPS, MODULES
from prune_core.spec import DEFAULT_SYS_TOKENS, DEFAULT_TXT_TOKENS, GroupSizes
from prune_core.tokens import autoprune_section


def demo_model(out_dir: Path, preset: str, seed: int = 0, kv_heads: int | None = None,
               overwrite: bool = False, dtype: str | None = None, layers: int | None = None) -> Path:
    """Write a random LLaVA-1.5-architecture model of ``preset`` to ``out_dir``; return its path.

    ``dtype`` (fp32/fp16/bf16; default fp32, fp16 for llava-7b and next-7b) is the precision the weights are created
    and written in; ``layers`` overrides the decoder's layer count (a 7B-wide model with few layers).
    """
    from exporter.demo import build_demo_model
    from prune_core.device import torch_dtype

    overrides = {"kv_heads": kv_heads} if kv_heads else {}
    if layers is not None:
        overrides["layers"] = layers
    return build_demo_model(out_dir, preset, seed=seed, overwrite=overwrite,
                            dtype=torch_dtype(dtype) if dtype else None, **overrides)


def demo_data(out_dir: Path, samples: int = 8, seed: int = 0) -> Path:
    """Write a synthetic VQA data set to ``out_dir``; return the path of its data.jsonl."""
    from exporter.demo import build_demo_data

    return build_demo_data(out_dir, samples=samples, seed=seed)


def _spec(model_dir: Path) -> Any:
    from exporter.adapters import load_spec

    return load_spec(model_dir)


def _sys_tokens(model_dir: Path) -> int | None:
    """The model's system-prompt tokens from its tokenizer (None when there is no tokenizer)."""
    from exporter.adapters import adapter_class

    return adapter_class(model_dir).sys_tokens_from_folder(model_dir)


def model_info(model_dir: Path, text_tokens: int | None = None,
               image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Architecture, token groups of the reference prompt, operations and dense prefill FLOPs (``info``).

    ``image_size`` (height, width): an any-resolution model's prompt for an image of that size (default: the
    image that gives the most visual tokens, the plans' reference layout); refused for fixed-size models.
    """
    spec = _spec(model_dir)
    if image_size is not None and not spec.any_resolution:
        raise PlanError(f"{model_dir} is a {spec.family} model: every image gives {spec.visual_tokens} visual "
                        "tokens; --image-size applies to any-resolution models (LLaVA-NeXT)")
    if image_size is not None and min(image_size) < 1:
        raise PlanError(f"--image-size {image_size[1]}x{image_size[0]} must be positive (WIDTHxHEIGHT pixels)")
    image = image_size or spec.reference_image
    visual = spec.visual_tokens if image is None else spec.visual_tokens_for(*image)
    sys_tokens = _sys_tokens(model_dir)
    sys_source = "tokenizer" if sys_tokens is not None else "LLaVA-1.5 default"
    sizes = GroupSizes.for_prompt(spec, sys_tokens or DEFAULT_SYS_TOKENS, text_tokens or DEFAULT_TXT_TOKENS,
                                  visual=visual)  # fmt: skip
    dense = prefill_flops(spec, sizes)
    operations = spec.num_layers * len(GROUPS) * len(MODULES)
    return {
        "model": str(model_dir),
        "family": spec.family,
        "fingerprint": spec.fingerprint(),
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "heads": spec.num_heads,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "visual_tokens": spec.visual_tokens,
        "prompt_visual_tokens": visual,
        "image": None if image is None else {"height": image[0], "width": image[1]},
        "tile_tokens": spec.tile_tokens,
        "image_grid_pinpoints": None if spec.image_grid_pinpoints is None else [list(p) for p in spec.image_grid_pinpoints],
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "groups": sizes.as_dict(),
        "sys_tokens_from": sys_source,
        "prompt_tokens": sizes.total,
        "operations": operations,
        "prunable_operations": spec.num_layers * 2 * len(MODULES),
        "dense_prefill_flops": dense,
        "spec": spec.to_json(),
    }


#: autoprune-schedule's options by AutoPrune setting (error messages name the flag).
_SCHEDULE_FLAGS = {"tokens": "--tokens", "x0": "--x0", "amplitude": "--amplitude", "k0": "--k0", "k_step": "--k-step"}


def autoprune_schedule(model_dir: Path, tokens: float, k: float, x0: float | None = None,
                       amplitude: float | None = None, use_table: bool = False, k0: float | None = None,
                       k_step: float | None = None, text_tokens: int | None = None) -> dict[str, Any]:
    """AutoPrune's schedule at budget ``tokens`` and steepness ``k`` on the model, with the FLOPs ratio of the
    reference prompt (``autoprune-schedule``). ``use_table``: the schedule table's row, not the exact solve."""
    spec = _spec(model_dir)
    if spec.num_layers < 2:
        raise PlanError(f"AutoPrune needs at least 2 decoder layers; {model_dir} has {spec.num_layers}")
    if not (math.isfinite(k) and k >= 0):
        raise PlanError(f"--k (the curve's steepness, max(k0 - gamma*I1, 0)) must be a finite number >= 0, got {k}")
    given = {"tokens": tokens, "x0": x0, "amplitude": amplitude, "k0": k0, "k_step": k_step}
    section = autoprune_section(spec, {key: v for key, v in given.items() if v is not None}, _SCHEDULE_FLAGS)
    if use_table:
        table = ScheduleTable.for_section(section, spec.num_layers, spec.visual_tokens)
        sol = table.lookup(k)
    else:
        sol = solve_scale(k, section.tokens, spec.num_layers, spec.visual_tokens, section.x0, section.amplitude)
    sys_tokens = _sys_tokens(model_dir) or DEFAULT_SYS_TOKENS
    txt = text_tokens or DEFAULT_TXT_TOKENS
    entering = [spec.visual_tokens, *sol.tokens_per_layer[:-1]]  # visual tokens entering layers 0..L-1
    sizes = [GroupSizes(sys=sys_tokens, img_key=0, img_rest=v, txt=txt) for v in entering]
    dense = prefill_flops(spec, GroupSizes.for_prompt(spec, sys_tokens, txt))
    return {
        "model": str(model_dir), "layers": spec.num_layers, "visual_tokens": spec.visual_tokens,
        "tokens": section.tokens, "k": k, "mode": "table" if use_table else "exact", "schedule_k": sol.k,
        "x0": section.x0, "amplitude": section.amplitude,
        "n0": sol.n0, "scale": sol.scale, "keep": list(sol.keep), "merged": list(sol.merged),
        "tokens_per_layer": list(sol.tokens_per_layer), "mean": sol.mean, "error": sol.error,
        "flops_ratio": prefill_flops(spec, sizes) / dense,
        "prompt": {"sys": sys_tokens, "visual": spec.visual_tokens, "txt": txt},
    }

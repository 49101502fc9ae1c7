"""What several test files share: random test images, the questions asked of them, and plan-kind tables.

The package's modules hold the rest: ``helpers.cli`` (CLI runs and one-line errors), ``helpers.engine_graphs``
(small ONNX graphs), ``helpers.fake_tensorrt`` (a strict stand-in ``tensorrt`` module),
``helpers.calib_stubs`` (stub evaluators) and ``helpers.ort_session`` (a CPU ONNX Runtime session).
Imported at module level as ``from helpers import ...`` / ``from helpers.cli import ...`` (the rule is in
tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from PIL import Image

from prune_core.ops import Group, Module, Operation
from prune_core.plan import AutoPruneSection, FixedScheduleSection
from prune_export.workflows.selection import PlanChoice

# -- images and prompts ------------------------------------------------------------------------------------


def random_image(seed: int) -> Image.Image:
    """A 90 x 70 RGB image of uniform random pixels (``numpy.random.RandomState(seed)``): the same pixels for
    the same seed, in every test file that asks."""
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(70, 90, 3) * 255).astype("uint8"))


#: The short question most tests ask.
SQUARE_QUESTION = "What color is the square?"
#: A longer question (more text tokens).
DOGS_QUESTION = "How many dogs are there in this picture, and where are they standing?"
#: The longest question (more text tokens again, and another AutoPrune complexity).
CAR_QUESTION = "Is there a red car on the left side of the street, next to the house with the green door?"
#: Three prompts as (image seed, question): different images, question lengths and complexities I1 (hence
#: AutoPrune schedule rows).
PROMPTS = [(0, SQUARE_QUESTION), (1, DOGS_QUESTION), (2, CAR_QUESTION)]
#: LLaVA-1.5's prompt written out, for HuggingFace's processor (the demo folder has no chat template).
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

# -- plan kinds --------------------------------------------------------------------------------------------


def plan_kinds(
    autoprune: AutoPruneSection,
    *,
    gsop: frozenset[Operation] | None = None,
    fixed: list[tuple[int, int]] | None = None,
    split: dict[str, AutoPruneSection] | None = None,
    combined: frozenset[Operation] | None = None,
    count_ops: bool = False,
) -> dict[str, PlanChoice]:
    """The plans a build test goes through, by name, in this order:

    ``dense`` (no pruning); ``gsop`` (the ops ``gsop``, when given); ``fixed`` (a fixed keep schedule of
    the stages ``fixed``, when given); ``autoprune`` (the section ``autoprune``); one entry per item of
    ``split`` (name: its AutoPrune section, for TensorRT's split prefill); ``combined`` (the ops
    ``combined`` together with the section ``autoprune``, when given).

    ``count_ops`` records ``{"operations": N}`` in the info of the entries with ops, as plan selection does.
    """

    def info(ops: frozenset[Operation]) -> dict[str, int]:
        return {"operations": len(ops)} if count_ops else {}

    kinds = {"dense": PlanChoice()}
    if gsop is not None:
        kinds["gsop"] = PlanChoice(gsop, None, info(gsop))
    if fixed is not None:
        kinds["fixed"] = PlanChoice(frozenset(), FixedScheduleSection(stages=fixed), {})
    kinds["autoprune"] = PlanChoice(frozenset(), autoprune, {})
    for name, section in (split or {}).items():
        kinds[name] = PlanChoice(frozenset(), section, {})
    if combined is not None:
        kinds["combined"] = PlanChoice(combined, autoprune, info(combined))
    return kinds


def on_targets(kinds: dict[str, PlanChoice], tensorrt: Collection[str]) -> dict[str, tuple[PlanChoice, str]]:
    """Each plan with the build target it is built for: ``tensorrt`` for the names in ``tensorrt``,
    ``onnxruntime`` for the others."""
    target = {name: "tensorrt" if name in tensorrt else "onnxruntime" for name in kinds}
    return {name: (choice, target[name]) for name, choice in kinds.items()}


#: GSOP ops of the tiny model's build tests (4 layers): every module of img_rest at layer 3, and the MLP of
#: both image groups at layer 2.
TINY_GSOP_OPS = frozenset(
    [Operation(3, Group.IMG_REST, m) for m in Module]
    + [Operation(2, g, Module.MLP) for g in (Group.IMG_KEY, Group.IMG_REST)]
)


def tiny_plan_kinds(*, combined: frozenset[Operation] | None = None) -> dict[str, PlanChoice]:
    """dense, gsop (:data:`TINY_GSOP_OPS`), fixed (keep 6 tokens after layer 1) and AutoPrune (T=4) on the
    tiny model, ops counted in the info; plus ``combined`` (those ops with the AutoPrune section) if given."""
    return plan_kinds(
        AutoPruneSection(tokens=4), gsop=TINY_GSOP_OPS, fixed=[(1, 6)], combined=combined, count_ops=True
    )

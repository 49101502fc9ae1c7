"""Pass manager with per-pass reports, and the one list that fixes the default pipeline order.

onnx-ir has its own ``PassManager``; this one adds what the build manifest needs: the name, the
``modified`` flag and the wall time of every pass, and it lets user-facing errors
(:class:`~prune_core.errors.PruneExportError`, e.g. a lint failure) through unwrapped so the CLI
can print them on one line. Any other failure is wrapped with the name of the pass and the passes
that ran before it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence

import onnx_ir as ir

from graph_passes.bound_shapes import Bound, BoundShapesPass
from graph_passes.cast import FLOAT_DTYPES, CastPrecisionPass
from graph_passes.cleanup import CleanupPass
from graph_passes.normalize import DEFAULT_IR_VERSION, DEFAULT_MIN_OPSET, NormalizeVersionsPass
from graph_passes.tensorrt_lint import TensorRTLintPass
from prune_core.errors import PruneExportError
from prune_core.precision import TARGETS, check_target_dtype

__all__ = [
    "TARGETS",
    "PassManager",
    "PassReport",
    "PipelineResult",
    "default_pipeline",
]

#: Runtimes a pipeline can be built for.


@dataclasses.dataclass(frozen=True)
class PassReport:
    """One line of a pipeline report."""

    name: str
    modified: bool
    seconds: float


@dataclasses.dataclass
class PipelineResult(ir.passes.PassResult):
    """``PassResult`` plus one :class:`PassReport` per pass, in run order."""

    reports: list[PassReport] = dataclasses.field(default_factory=list)


def _pass_name(pass_: ir.passes.PassBase) -> str:
    return str(getattr(pass_, "name", type(pass_).__name__))


class PassManager(ir.passes.PassBase):
    """Run an explicit, ordered list of passes once each, timing and reporting every one.

    ``modified`` is true if any pass modified the model. Passes may be onnx-ir passes of any kind
    (in place or functional); the manager is in place when all of them are.
    """

    def __init__(self, passes: Sequence[ir.passes.PassBase]) -> None:
        super().__init__()
        if not passes:
            raise ValueError("PassManager needs at least one pass")
        self.passes = list(passes)

    @property
    def in_place(self) -> bool:
        return all(p.in_place for p in self.passes)

    @property
    def changes_input(self) -> bool:
        return self.passes[0].changes_input or self.passes[0].in_place

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(repr(p) for p in self.passes)}])"

    def call(self, model: ir.Model) -> PipelineResult:
        reports: list[PassReport] = []
        for pass_ in self.passes:
            name = _pass_name(pass_)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except PruneExportError:
                raise
            except Exception as err:
                done = [r.name for r in reports]
                raise ir.passes.PassError(f"pass {name} failed (after {done})") from err
            reports.append(PassReport(name, result.modified, time.perf_counter() - start))
            model = result.model
        return PipelineResult(model, any(r.modified for r in reports), reports)

    def run(self, model: ir.Model) -> PipelineResult:
        """Run the pipeline; same as calling the manager, with the precise return type."""
        result = self(model)
        assert isinstance(result, PipelineResult)
        return result


def default_pipeline(
    target: str,
    dtype: str,
    shape_bounds: Mapping[str, Bound] | None = None,
    *,
    ir_version: int = DEFAULT_IR_VERSION,
    min_opset: int = DEFAULT_MIN_OPSET,
    keep_fp32_io: Iterable[str] = (),
) -> list[ir.passes.PassBase]:
    """The ordered passes for a runtime and precision; the whole pipeline order lives here.

    Order and why:

    1. :class:`NormalizeVersionsPass`: later passes read opset-dependent schemas; the file must be
       readable by the target runtime.
    2. :class:`CleanupPass`: fold and prune before deciding precisions (fewer values to cast,
       types filled by inference).
    3. :class:`CastPrecisionPass` (fp16/bf16 only): precision goes into the file (``keep_fp32_io``: graph
       inputs/outputs that stay float32).
    4. :class:`CleanupPass` again after casting (drops dead nodes a cast left, folds casts of
       constants).
    5. :class:`BoundShapesPass`: always for TensorRT (an engine needs a profile for every dynamic
       dim, and shape-tensor input values need ranges); for onnxruntime only when bounds are given.
    6. :class:`TensorRTLintPass` last, TensorRT only: it checks the graph as it will be built.

    Raises:
        BuildError: unknown ``target`` or ``dtype`` (the message lists the known ones).
    """
    check_target_dtype(target, dtype)
    passes: list[ir.passes.PassBase] = [
        NormalizeVersionsPass(ir_version=ir_version, min_opset=min_opset),
        CleanupPass(),
    ]
    if FLOAT_DTYPES[dtype] is not None:
        passes += [CastPrecisionPass(dtype, keep_fp32_io=keep_fp32_io), CleanupPass()]
    if target == "tensorrt":
        passes.append(BoundShapesPass(shape_bounds or {}, require_value_bounds=True))
        passes.append(TensorRTLintPass())
    elif shape_bounds is not None:
        passes.append(BoundShapesPass(shape_bounds))
    return passes

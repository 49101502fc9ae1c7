"""ONNX graph passes between export and engine build: clean, fold, cast, bound, lint, census.

Analyses beside the rewrites: :func:`census` (FLOPs), :func:`parser_findings` (TensorRT's operator table),
:class:`ValueRanges` (proved value intervals).

Each rewrite is an :class:`onnx_ir.passes.InPlacePass` (one per module) returning
``PassResult(model, modified)`` with a truthful ``modified`` flag; :func:`default_pipeline` holds
the one list that fixes their order for a target runtime and precision, and :class:`PassManager`
runs it with per-pass reports. :func:`census` is an analysis, not a rewrite.

Typical use::

    import onnx_ir as ir
    from graph_passes import PassManager, default_pipeline

    model = ir.load("prefill.onnx")
    result = PassManager(default_pipeline("tensorrt", "fp16", {"seq": (1, 2048)})).run(model)
    ir.save(result.model, "prefill.opt.onnx")
"""

from graph_passes.base import GraphPass, structural_fingerprint
from graph_passes.bound_shapes import SHAPE_BOUNDS_KEY, BoundShapesPass, read_shape_bounds
from graph_passes.cast import DEFAULT_KEEP_FP32_OPS, FLOAT_DTYPES, CastPrecisionPass, CastStats
from graph_passes.census import GraphCensus, MatMulCost, census, matmul_flops
from graph_passes.cleanup import CleanupPass
from graph_passes.manager import TARGETS, PassManager, PassReport, PipelineResult, default_pipeline
from graph_passes.normalize import NormalizeVersionsPass, max_opset_for_ir
from graph_passes.tensorrt_lint import TOPK_MAX_K, LintFinding, TensorRTLintPass, lint_tensorrt
from graph_passes.tensorrt_parser import parser_findings
from graph_passes.value_range import ValueRanges

__all__ = [
    "DEFAULT_KEEP_FP32_OPS",
    "FLOAT_DTYPES",
    "SHAPE_BOUNDS_KEY",
    "TARGETS",
    "TOPK_MAX_K",
    "BoundShapesPass",
    "CastPrecisionPass",
    "CastStats",
    "CleanupPass",
    "GraphCensus",
    "GraphPass",
    "LintFinding",
    "MatMulCost",
    "NormalizeVersionsPass",
    "PassManager",
    "PassReport",
    "PipelineResult",
    "TensorRTLintPass",
    "ValueRanges",
    "census",
    "default_pipeline",
    "lint_tensorrt",
    "matmul_flops",
    "max_opset_for_ir",
    "parser_findings",
    "read_shape_bounds",
    "structural_fingerprint",
]

"""Build targets and precisions, and the parts of a graph that keep float32 when a build lowers its precision
to fp16 or bf16.

The exporter runs numerically fragile steps (AutoPrune's mutual information and token scores, DPC-KNN
recycling) inside a module of class :data:`FP32_REGION_CLASS`. ``torch.onnx`` records each exported node's
module classes in its ``pkg.torch.onnx.class_hierarchy`` metadata, and the precision pass
(:class:`graph_passes.cast.CastPrecisionPass`) keeps every float node of such a region in float32, casting
at its edges. Without it, a TensorRT build (float32 scores, since TensorRT has no float64) would compute
DPC-KNN distances and cluster means in fp16 and merge other tokens than the reference.
"""

from __future__ import annotations

from .errors import BuildError

#: What a build is made for: ONNX Runtime, or TensorRT (linted graphs, bounded shapes, engines).
TARGETS = ("onnxruntime", "tensorrt")
#: The float precisions a build's graphs can be written in.
DTYPES = ("fp32", "fp16", "bf16")


def check_dtype(dtype: str) -> None:
    """One line for a precision no build can be written in."""
    if dtype not in DTYPES:
        raise BuildError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")


def check_target_dtype(target: str, dtype: str) -> None:
    """One line for a target or a precision no build can be made for (the message lists the known ones)."""
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; expected one of {list(TARGETS)}")
    check_dtype(dtype)

#: Class name of the exporter's float32 region module (:class:`exporter.baked.Float32Region`).
FP32_REGION_CLASS = "Float32Region"
#: Node metadata key in which torch.onnx lists the module classes a node was traced in.
CLASS_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"


def in_fp32_region(metadata: dict[str, str]) -> bool:
    """Whether a node with these ``metadata_props`` was traced inside a float32 region."""
    hierarchy = metadata.get(CLASS_HIERARCHY_KEY, "")
    return f".{FP32_REGION_CLASS}'" in hierarchy or f"'{FP32_REGION_CLASS}'" in hierarchy

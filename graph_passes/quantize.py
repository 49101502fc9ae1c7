"""int8 quantization of a graph's weight matmuls in the explicit Q/DQ form (ONNX Runtime's tooling).

Two modes, both on the ``MatMul``/``Gemm`` nodes whose second input is a weight (an initializer): the
projections of attention and MLP, and the LM head. Everything else stays in float: attention scores and
their softmax (matmuls of two activations), TopK and the AutoPrune scores, norms, rotary, residual adds.

* ``int8``: static quantization, ``onnxruntime.quantization.quantize_static`` in ``QuantFormat.QDQ``:
  weights int8 per output channel, symmetric; the matmuls' activation inputs 8-bit per tensor: int8
  symmetric for TensorRT (zero point 0, what its explicit quantization requires), uint8 asymmetric for
  ONNX Runtime (its fast x86 kernels, see :data:`ACTIVATIONS`), their ranges calibrated by min/max on the feeds given
  (the caller builds them from calibration prompts). Outputs stay float, and each quantized matmul has its
  own Q/DQ pair, so no other node ever reads a rounded tensor.
* ``int8-weights``: weight-only. Each weight becomes int8 per output channel, symmetric, behind a
  ``DequantizeLinear``; activations stay float. Scales and rounding come from ORT's quantization utilities
  (``compute_scale_zp``, ``quantize_nparray``); no calibration data is needed.

Rewrite, per weight matmul ``Y = MatMul(X, W)``:
``int8``:          ``Y = MatMul(DQ(Q(X)), DQ(W_int8))``
``int8-weights``:  ``Y = MatMul(X, DQ(W_int8))``
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

QUANTIZE_MODES = ("int8", "int8-weights")


@dataclass
class QuantizeReport:
    """What a quantization did to one graph (recorded in the build manifest)."""

    graph: str
    mode: str
    weight_matmuls: int
    quantized: int
    calibration_feeds: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "mode": self.mode, "weight_matmuls": self.weight_matmuls,
                "quantized": self.quantized, "calibration_feeds": self.calibration_feeds, **self.settings}


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """``MatMul``/``Gemm`` nodes of the main graph whose second input is an initializer (a weight)."""
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a unique name: ORT's quantizer selects nodes by name."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _save(model: onnx.ModelProto, dst: Path, external: bool) -> None:
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


class _Feeds:
    """A ``CalibrationDataReader`` over an iterable of feed dicts (counted)."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        from onnxruntime.quantization import CalibrationDataReader

        self.count = 0
        outer = self

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

            def get_next(self) -> dict[str, np.ndarray] | None:
                item = next(self._it, None)
                if item is not None:
                    outer.count += 1
                return item

        self.reader = Reader()


#: Activation formats of static int8: ONNX Runtime's x86 integer kernels want unsigned asymmetric activations
#: (U8S8: 1.75x faster than fp32 on the bench prefill here, where signed S8S8 was 3x slower than fp32);
#: TensorRT's explicit quantization wants signed symmetric ones (zero point 0).
ACTIVATIONS = {"onnxruntime": "uint8 asymmetric", "tensorrt": "int8 symmetric"}


def quantize_int8(src: Path, dst: Path, feeds: Iterable[dict[str, np.ndarray]],
                  activations: str = "int8 symmetric") -> QuantizeReport:
    """Static int8 Q/DQ of ``src``'s weight matmuls, activations calibrated on ``feeds``; writes ``dst``.

    ``activations``: ``int8 symmetric`` (TensorRT) or ``uint8 asymmetric`` (ONNX Runtime's x86 kernels)."""
    import itertools
    import tempfile

    if activations not in ACTIVATIONS.values():
        raise ValueError(f"activations must be one of {sorted(ACTIVATIONS.values())}, got {activations!r}")
    signed = activations == "int8 symmetric"

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = iter(feeds)
    first = next(feeds, None)
    if first is None:
        raise ValueError("int8 quantization needs at least one calibration feed (activation ranges come from them)")
    feeds = itertools.chain([first], feeds)
    model = onnx.load(str(src), load_external_data=False)
    external = _has_external_data(model)
    _name_nodes(model)
    targets = [n.name for n in weight_matmuls(model)]
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        named = Path(tmp) / src.name
        if external:  # the names only change the graph; the weights stay where they are
            onnx.load_external_data_for_model(model, str(src.parent))
        _save(model, named, external)
        del model
        reader = _Feeds(feeds)
        quantize_static(
            str(named), str(dst), reader.reader, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=targets, per_channel=True,
            activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
            # inputs only: a matmul's output stays float for what follows (rotary, attention scores,
            # softmax, residual adds), and consumers outside the quantized set never see rounded values
            extra_options={"ActivationSymmetric": signed, "WeightSymmetric": True, "MatMulConstBOnly": True,
                           "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"], "DedicatedQDQPair": True},
        )
    quantized = onnx.load(str(dst), load_external_data=False)
    done = sum(1 for n in weight_matmuls_after(quantized))
    return QuantizeReport(src.stem, "int8", len(targets), done, reader.count,
                          {"weights": "int8 per-channel symmetric", "activations": f"{activations} per tensor, min/max"})


def weight_matmuls_after(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """``MatMul``/``Gemm`` nodes whose second input comes from a ``DequantizeLinear`` of an initializer."""
    inits = {i.name for i in model.graph.initializer}
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in dq]


def _channel_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the weight: ``Gemm(transB=1)`` holds it as ``[out, in]``."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1


def quantize_int8_weights(src: Path, dst: Path) -> QuantizeReport:
    """Weight-only int8 Q/DQ of ``src``'s weight matmuls (per output channel, symmetric); writes ``dst``."""
    from onnxruntime.quantization.quant_utils import QuantType as QT
    from onnxruntime.quantization.quant_utils import (
        compute_scale_zp,
        get_qmin_qmax_for_qType,
        quantize_nparray,
    )

    model = onnx.load(str(src), load_external_data=False)
    external = _has_external_data(model)
    if external:
        onnx.load_external_data_for_model(model, str(src.parent))
    _name_nodes(model)
    targets = weight_matmuls(model)
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1
    qtype = QT.QInt8.tensor_type
    qmin, qmax = get_qmin_qmax_for_qType(qtype, symmetric=True)
    new_nodes: dict[str, onnx.NodeProto] = {}
    done: dict[str, str] = {}
    for node in targets:
        w_name = node.input[1]
        axis = _channel_axis(node)
        key = f"{w_name}@{axis}"
        if key not in done:
            w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            if w.ndim != 2:
                continue
            channels = np.moveaxis(w, axis, 0)
            scales, q = [], []
            for row in channels:
                rmin, rmax = np.minimum(row.min(), 0), np.maximum(row.max(), 0)
                zp, scale = compute_scale_zp(np.array(rmin, np.float32), np.array(rmax, np.float32), qmin, qmax,
                                             symmetric=True)
                scales.append(float(scale))
                q.append(quantize_nparray(qtype, row, scale, zp))
            q_arr = np.moveaxis(np.stack(q).astype(np.int8), 0, axis)
            base = f"{w_name}_int8" if axis == 0 else f"{w_name}_int8_ax{axis}"
            model.graph.initializer.append(numpy_helper.from_array(q_arr, base))
            model.graph.initializer.append(numpy_helper.from_array(np.array(scales, np.float32), base + "_scale"))
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(len(scales), np.int8), base + "_zero_point"))
            out = base + "_dequantized"
            new_nodes[out] = onnx.helper.make_node(
                "DequantizeLinear", [base, base + "_scale", base + "_zero_point"], [out], name=base + "_DequantizeLinear",
                axis=axis,
            )
            done[key] = out
        node.input[1] = done[key]
        users[w_name] -= 1
    for name, count in users.items():
        if count == 0 and name in inits:
            model.graph.initializer.remove(inits[name])
    # DequantizeLinear nodes first: their inputs are initializers, so the order stays topological.
    nodes = list(new_nodes.values()) + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _save(model, dst, external)
    return QuantizeReport(src.stem, "int8-weights", len(targets), len(weight_matmuls_after(model)), 0,
                          {"weights": "int8 per-channel symmetric", "activations": "float"})


def quantize_graph(src: Path, dst: Path, mode: str, feeds: Iterable[dict[str, np.ndarray]] = (),
                   target: str = "tensorrt") -> QuantizeReport:
    """Quantize ``src`` into ``dst`` (which may be ``src``) in ``mode`` (:data:`QUANTIZE_MODES`), with the
    activation format of ``target`` (:data:`ACTIVATIONS`)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    tmp = dst.with_name(dst.stem + ".quantized.onnx")
    report = (quantize_int8(src, tmp, feeds, ACTIVATIONS[target]) if mode == "int8"
              else quantize_int8_weights(src, tmp))
    report.graph = src.stem
    tmp.replace(dst)
    data = tmp.with_name(tmp.name + ".data")
    if data.exists():  # the graph refers to its data file by name: rewrite the reference with the move
        model = onnx.load(str(dst))
        _save(model, dst, True)
        data.unlink()
    return report

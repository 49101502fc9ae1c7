"""int8 builds: calibration feeds for every graph that gets quantized, then the Q/DQ rewrite of each.

The calibration prompts are built by the executor's own pipeline (tokenizer, vision tower, token groups)
from rows of a calibration file, exactly as the search prepares its rows. Each graph is calibrated on the
inputs it really sees: the prefill on the prompts; a split prefill's tail on its head's outputs; the decode
graph on the KV caches the (still float) prefill produced and a few greedy steps after them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prune_core.errors import BuildError

Log = Callable[[str], None]

#: Greedy decode steps per calibration prompt whose inputs calibrate the decode graph.
DECODE_CALIBRATION_STEPS = 4


def check_quantize_options(quantize: str | None, dtype: str, calib: Path | None, low_memory: bool) -> None:
    """One line for options that cannot go together (before anything is exported)."""
    if quantize is None:
        if calib is not None:
            raise BuildError("--calib is the calibration data of --quantize int8; pass --quantize int8 with it")
        return
    if dtype != "fp32" or low_memory:
        raise BuildError(
            f"--quantize {quantize} quantizes fp32 graphs (int8 weights, float activations where they stay "
            f"float); it does not combine with --dtype {dtype}{' --low-memory' if low_memory else ''}: drop "
            "--dtype (fp32 is the default)"
        )
    if quantize == "int8" and calib is None:
        raise BuildError(
            "--quantize int8 calibrates activation ranges on real prompts: pass --calib CALIB.jsonl (rows of "
            "image/question, the eval format; answers are not needed), or use --quantize int8-weights, "
            "which needs no data"
        )
    if quantize == "int8-weights" and calib is not None:
        raise BuildError("--quantize int8-weights needs no calibration data; drop --calib (or use --quantize int8)")
    if calib is not None and not Path(calib).is_file():
        raise BuildError(f"calibration file {calib} does not exist; pass a JSONL file of image/question rows")


def calibration_prefill_feeds(adapter: Any, calib: Path, rows: int) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Prefill inputs of the first ``rows`` rows of ``calib``, prepared by the executor's pipeline."""
    from calib.data import data_fingerprint, load_rows
    from exporter.baked import BakedPrefill
    from exporter.sample import prepare_sample

    data = load_rows(calib, require_answer=False, limit=rows)
    feeds = []
    for row in data:
        sample = prepare_sample(adapter, row.load_image(), row.question)
        feeds.append(BakedPrefill.feeds_from_sample(sample))
    info = {"calibration": str(Path(calib).resolve()), "calibration_rows": len(data),
            "calibration_fingerprint": data_fingerprint(data)}
    return feeds, info


def _decode_feeds(work: Path, present: list[dict[str, np.ndarray]], num_layers: int) -> Iterator[dict[str, np.ndarray]]:
    """Inputs of the decode graph: each prompt's prefill caches, then a few greedy steps on from them
    (generated as the calibrator asks for them)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(work / "decode.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    kinds = ("key", "value", "position")
    for out in present:
        past = {f"past.{layer}.{kind}": out[f"present.{layer}.{kind}"] for layer in range(num_layers) for kind in kinds}
        token = int(np.argmax(out["logits"][0]))
        for _ in range(DECODE_CALIBRATION_STEPS):
            feed = {"input_ids": np.array([[token]], dtype=np.int64), **past}
            yield feed
            step = dict(zip(names, session.run(names, feed), strict=True))
            token = int(np.argmax(step["logits"][0]))
            past = {f"past.{layer}.{kind}": step[f"present.{layer}.{kind}"] for layer in range(num_layers) for kind in kinds}


def quantize_build(work: Path, manifest: Any, mode: str, prefill_feeds: list[dict[str, np.ndarray]],
                   num_layers: int, target: str, log: Log) -> list[dict[str, Any]]:
    """Quantize the prefill graph(s) and the decode graph of the build in ``work`` in place.

    ``manifest`` is the build's provisional manifest (the float graphs). Vision and embed stay float.
    Activations take ``target``'s int8 format. Returns one report per graph; for ``--target tensorrt`` the
    quantized graphs must pass the TensorRT lint.
    """
    from engines.prefill import PrefillRunner
    from graph_passes.quantize import quantize_graph

    split = manifest.prefill_layout == "split"
    feeds: dict[str, Iterable[dict[str, np.ndarray]]] = {}
    if mode == "int8":
        present = []
        tails = []
        with PrefillRunner(work, provider="cpu", manifest=manifest) as runner:
            for feed in prefill_feeds:
                if split:
                    _, tail = runner.run_head(feed)
                    tails.append(tail)
                present.append(runner.infer(feed))
        if split:
            feeds["prefill_head"], feeds["prefill_tail"] = prefill_feeds, tails
        else:
            feeds["prefill"] = prefill_feeds
        feeds["decode"] = _decode_feeds(work, present, num_layers)
    graphs = ["prefill_head", "prefill_tail"] if split else ["prefill"]
    reports = []
    for name in [*graphs, "decode"]:
        path = work / f"{name}.onnx"
        report = quantize_graph(path, path, mode, feeds.get(name, ()), target=target)
        log(f"  {name}.onnx: {report.quantized} of {report.weight_matmuls} weight matmuls quantized ({mode}"
            f"{f', {report.calibration_feeds} calibration feeds' if report.calibration_feeds else ''})")
        reports.append(report.to_json())
        if target == "tensorrt":
            _lint(path)
    return reports


def _lint(path: Path) -> None:
    import onnx_ir as ir

    from graph_passes.tensorrt_lint import lint_tensorrt

    findings = lint_tensorrt(ir.load(str(path)))
    if findings:
        listed = "; ".join(str(f) for f in findings[:5])
        raise BuildError(f"the quantized {path.name} does not pass the TensorRT lint: {listed}")

"""A Python-based Triton backend that serves ``backend: "onnxruntime"`` models with ONNX Runtime.

``prune-export serve`` installs this file as ``<backend dir>/onnxruntime/model.py``. Triton's Python backend
then loads it for every model whose configuration names the ``onnxruntime`` backend (or the
``onnxruntime_onnx`` platform), so the local server runs an unchanged, standard model repository although
the bundled ``tritonserver`` has no native onnxruntime backend. In production the NGC container's native
backend serves the same directory; this file is never part of a repository.

What it does, per model instance:

- opens ``<repository>/<model>/<version>/<default_model_filename>`` (``model.onnx``) on the CPU with ONNX
  Runtime, threads from the model's ``parameters`` (``intra_op_thread_count``; default: ONNX Runtime's) and
  spinning off (idle sessions in other model processes must not take the cores from the busy one);
- refuses to load, naming every difference, when the configuration disagrees with the session (input and
  output names, element types, ranks, fixed dims): the server log then says what to regenerate;
- answers each request with the outputs it asked for (all outputs when it names none). A request whose
  tensors do not fit the graph gets an error response; the model stays loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

#: ONNX Runtime's type strings -> Triton data types.
ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int16)": "TYPE_INT16",
    "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL",
}  # fmt: skip


def _parameter(config: dict, key: str) -> str | None:
    value = config.get("parameters", {}).get(key)
    return None if value is None else str(value.get("string_value", ""))


def config_problems(config: dict, session) -> list[str]:
    """Every difference between the model configuration and the ONNX Runtime session."""
    problems = []
    for kind, declared, actual in (("input", config.get("input", []), session.get_inputs()),
                                   ("output", config.get("output", []), session.get_outputs())):  # fmt: skip
        graph = {a.name: a for a in actual}
        names = {d["name"] for d in declared}
        for missing in sorted(set(graph) - names):
            if kind == "input":
                problems.append(f"graph input {missing} is not in config.pbtxt")
        for d in declared:
            a = graph.get(d["name"])
            if a is None:
                problems.append(f"{kind} {d['name']} of config.pbtxt is not a graph {kind}")
                continue
            want = ORT_TO_TRITON.get(a.type, a.type)
            if d["data_type"] != want:
                problems.append(f"{kind} {d['name']} is {d['data_type']} in config.pbtxt, {want} in the graph")
            dims = [int(x) for x in d.get("dims", [])]
            if len(dims) != len(a.shape):
                problems.append(f"{kind} {d['name']} has {len(dims)} dims in config.pbtxt, rank {len(a.shape)} in the graph")
                continue
            for i, (c, g) in enumerate(zip(dims, a.shape, strict=True)):
                if isinstance(g, int) and c != -1 and c != g:
                    problems.append(f"{kind} {d['name']} dim {i} is {c} in config.pbtxt, {g} in the graph")
    return problems


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        self.config = json.loads(args["model_config"])
        if int(self.config.get("max_batch_size", 0)) != 0:
            raise pb_utils.TritonModelException(
                f"{self.config['name']}: max_batch_size {self.config['max_batch_size']} is not served by the "
                "local onnxruntime backend; prune-export graphs carry their batch dimension (max_batch_size: 0)"
            )
        filename = self.config.get("default_model_filename") or "model.onnx"
        path = Path(args["model_repository"]) / args["model_version"] / filename
        if not path.is_file():
            raise pb_utils.TritonModelException(f"{self.config['name']}: model file {path} does not exist")
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        threads = _parameter(self.config, "intra_op_thread_count")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        problems = config_problems(self.config, self.session)
        if problems:
            raise pb_utils.TritonModelException(
                f"{self.config['name']}: config.pbtxt disagrees with {path.name}: " + "; ".join(problems)
                + " (regenerate the repository with prune-export deploy)"
            )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, request) -> pb_utils.InferenceResponse:
        feeds = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"input {name} is missing"))
            feeds[name] = tensor.as_numpy()
        wanted = list(request.requested_output_names()) or self.outputs
        try:
            values = self.session.run(wanted, feeds)
        except Exception as exc:  # ONNX Runtime reports bad shapes/values as several exception types
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.config['name']}: {message}"))
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in zip(wanted, values, strict=True)]
        )

    def execute(self, requests: list) -> list:
        return [self._run(request) for request in requests]

    def finalize(self) -> None:
        self.session = None

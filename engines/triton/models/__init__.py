"""Source files that ``prune-export`` copies into Triton: they run inside Triton's Python backend.

- :mod:`.orchestrator` becomes ``REPO/NAME/1/model.py``: the model a client calls (image + question in,
  answer out), driving the graph models by BLS requests.
- :mod:`.onnxruntime_backend` becomes ``<backend dir>/onnxruntime/model.py`` for ``prune-export serve`` only:
  a Python-based backend that serves the repository's ``backend: "onnxruntime"`` graph models with ONNX
  Runtime where the native onnxruntime backend is not installed (the ``tritonserver`` bundled with
  nvidia-pytriton has the Python backend only). The NGC container's native backend serves the same
  repository unchanged.

They import ``triton_python_backend_utils`` (present only inside Triton), numpy, onnxruntime and, for the
orchestrator, transformers and Pillow; never prune-export, which is not installed where they run.
"""

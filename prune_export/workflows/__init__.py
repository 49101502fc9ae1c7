"""Workflows: the code that wires the stages (exporter, graph_passes, engines, calib) together.

The CLI calls workflows; workflows call stages. Nothing else in the core package imports a stage, so the
arrows calib -> exporter -> graph_passes -> engines stay one-way. One module per workflow:

* ``build``: ``build`` (export, optimize, check a build dir), ``engines``, ``inspect``, prefill ``bench``.
* ``evaluate``: ``eval MODEL_DIR``, greedy answers of the PyTorch executor on a data set, dense or pruned.
* ``generate``: a build directory's answers (ONNX Runtime): ``run``, ``eval BUILD_DIR``, ``bench --generate``.
* ``model``: ``demo-model``, ``demo-data`` and what a config says (``info``, ``autoprune-schedule``).
* ``search``: ``search``, the journaled GSOP operation order on calibration data, written as a plan.
* ``selection``: what a run prunes (plan operations at a budget plus one token section), for eval and build.
"""

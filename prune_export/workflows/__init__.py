"""Workflows: the code that wires the stages (exporter, graph_passes, engines, calib) together.

The CLI calls workflows; workflows call stages. Nothing else imports a stage and a workflow, so the arrows
calib -> exporter -> graph_passes -> engines stay one-way. One module per job; none imports another's
private names:

* ``build``: ``build`` (export, graph passes, manifest) and ``engines`` (TensorRT); every default of a build
  in :class:`~prune_export.workflows.build.BuildSettings`.
* ``check``: a build's graphs against the PyTorch executor (outputs, greedy answers, FLOPs), with explicit
  arguments.
* ``open_build``: opening a finished build: its verified runner, check prompt feeds, images, graph FLOPs.
* ``measure``: ``inspect``, ``bench``, ``bench --generate`` and the sweep's time to first token, all timed by
  the one interleaved timer.
* ``generate``: a build's answers (ONNX Runtime): ``run``, ``eval BUILD_DIR``.
* ``evaluate``: ``eval`` of a model folder (the PyTorch executor) or a build, and the dense answers that
  agreement compares with.
* ``selection``: what a run prunes (:class:`~prune_export.workflows.selection.PlanRequest` in, plan
  operations at a budget plus one token section out), for eval, sweep and build.
* ``quantize``: int8 builds' calibration feeds and Q/DQ rewrite.
* ``search``: ``search``, the journaled GSOP operation order on calibration data, written as a plan.
* ``sweep``: many configurations evaluated (and optionally built and timed) into one report.
* ``model``: ``demo-model``, ``demo-data`` and what a config says (``info``, ``autoprune-schedule``).
* ``deploy``: ``deploy``, ``serve``, ``ask`` (Triton).
"""

"""Workflows: the code that wires the stages (exporter, graph_passes, engines, calib) together.

The CLI calls workflows; workflows call stages. Nothing else in the core package imports a stage, so the
arrows calib -> exporter -> graph_passes -> engines stay one-way. One module per workflow: ``build``
(export, optimize, check, engines, inspect, prefill bench), ``generate`` (answers from a build directory:
``run``, ``eval BUILD_DIR``, ``bench --generate``).
"""

"""The ``prune-export`` command line: a thin layer that maps options onto workflow calls and prints.

Each command (:mod:`prune_export.commands`, one module per job) calls one workflow
(:mod:`prune_export.workflows`); the CLI itself never imports a stage (calib, exporter, graph_passes,
engines). Options shared by several commands are declared once (:mod:`prune_export.options`) with their
defaults from :mod:`prune_core.defaults`; rules on their values live in the workflows. Errors a user can
cause (:class:`~prune_core.errors.PruneExportError`) print one line and exit 1; anything else is a bug and
keeps its traceback. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

from importlib.metadata import version

import click

from .commands import build, evaluate, model, triton
from .output import UserErrorGroup


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("prune-export"), prog_name="prune-export")
def main() -> None:
    """Compile pruning plans of LLaVA-family VLMs into ONNX / TensorRT engines and measure the speedup."""


for command in (
    model.demo_model, model.demo_data, model.info, model.plan, model.autoprune_schedule,
    evaluate.search, evaluate.eval_cmd, evaluate.sweep_cmd,
    build.build_cmd, build.check_cmd, build.engines_cmd, build.inspect_cmd, build.bench_cmd, build.run_cmd,
    triton.deploy_cmd, triton.serve_cmd, triton.ask_cmd,
):  # fmt: skip
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()

"""The options several commands share, each declared once; every default comes from
:mod:`prune_core.defaults`, the rules on option values live in the workflows.

* :func:`json_option`: ``--json``.
* :func:`device_option` / :func:`dtype_option` (and :func:`torch_options`, both for PyTorch): where a model
  runs and in which precision.
* :func:`image_size_option`: ``--image-size WIDTHxHEIGHT`` of an any-resolution (LLaVA-NeXT) prompt, handed
  to the command as ``(height, width)``.
* :func:`max_new_tokens_option`: the answer length, a positive integer (the workflow holds it to a build's
  bound).
* :func:`plan_options`: ``--plan``, ``--budget``, ``--keep-schedule``, the ``--autoprune-*`` settings and
  ``--no-recycle`` (eval adds ``--autoprune-mode``), handed to the command as one
  :class:`~prune_export.workflows.selection.PlanRequest` named ``request``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from prune_core import defaults

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])
#: ``--provider``: the ONNX Runtime provider of a build's graphs (``auto``: CUDA when it really runs).
PROVIDER_CHOICE = click.Choice(["auto", "cpu", "cuda"])


def _compose(*decorators: Decorator) -> Decorator:
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


def json_option(help: str = "Print one JSON object.") -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)


def device_option(help: str = f"Where PyTorch runs the model: cpu, cuda or cuda:N [default: {defaults.TORCH_DEVICE}].",
                  default: str | None = None) -> Decorator:  # fmt: skip
    return click.option("--device", default=default, show_default=default is not None, help=help)


def dtype_option(help: str = f"Precision of the PyTorch model (metrics stay fp32) [default: {defaults.TORCH_DTYPE}].",
                 name: str = "torch_dtype", default: str | None = None) -> Decorator:  # fmt: skip
    return click.option("--dtype", name, type=DTYPE_CHOICE, default=default, show_default=default is not None, help=help)


def torch_options() -> Decorator:
    """``--device`` and ``--dtype`` of a command that runs a model in PyTorch."""
    return _compose(device_option(), dtype_option())


def max_new_tokens_option(default: int | None, help: str = "Largest number of answer tokens.") -> Decorator:
    return click.option("--max-new-tokens", type=click.IntRange(min=1), default=default,
                        show_default=default is not None, help=help)  # fmt: skip


def plan_options(*, mode: bool = False) -> Decorator:
    """The options that say what to prune, collapsed into one ``request`` argument of the command."""
    options = [
        click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
                     help="Plan file (GSOP operations and/or a token section). No plan: the dense model."),
        click.option("--budget", type=float, default=None, help="Fraction of dense prefill FLOPs kept, in (0, 1]."),
        click.option("--keep-schedule", default=None,
                     help="Fixed visual-token schedule LAYER:TOKENS[,...] (FastV, PDrop)."),
        click.option("--autoprune-tokens", type=float, default=None,
                     help="AutoPrune budget T: average visual tokens per layer (LLaVA-1.5: 64, 128, 192). The "
                          "--autoprune-* options override a plan's AutoPrune section."),
        click.option("--autoprune-x0", type=float, default=None, help="AutoPrune curve midpoint x0 [default: 14.9]."),
        click.option("--autoprune-k0", type=float, default=None,
                     help="AutoPrune steepness k0 of a prompt with no mutual information [default: 0.4]."),
        click.option("--autoprune-gamma", type=float, default=None,
                     help="AutoPrune steepness drop per bit of I1: k = max(k0 - gamma*I1, 0) [default: 0.2]."),
        click.option("--autoprune-amplitude", type=float, default=None, help="AutoPrune curve height A [default: 0.75]."),
        click.option("--autoprune-positions", type=click.Choice(["renumbered", "original"]), default=None,
                     help="renumbered: positions 0..n'-1 after each prune (the reference); original: keep them "
                          "[default: the plan's, else renumbered]."),
        click.option("--autoprune-k-step", type=float, default=None,
                     help="AutoPrune schedule table: grid step of k [default: 0.01]."),
        click.option("--no-recycle", is_flag=True, help="AutoPrune: drop tokens without merging them (no recycling)."),
    ]  # fmt: skip
    if mode:
        options.append(click.option(
            "--autoprune-mode", type=click.Choice(["exact", "table"]), default=None,
            help="exact: bisection per prompt (the reference); table: schedule table built once, looked up by k "
                 "(what an engine does) [default: exact]."))  # fmt: skip
    keys = ("tokens", "x0", "k0", "gamma", "amplitude", "positions", "k_step")

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            from prune_core.tokens import parse_keep_schedule

            from .workflows.selection import PlanRequest

            autoprune = {k: kwargs.pop(f"autoprune_{k}") for k in keys}
            autoprune["recycle"] = False if kwargs.pop("no_recycle") else None
            schedule = kwargs.pop("keep_schedule")
            kwargs["request"] = PlanRequest(
                plan_path=kwargs.pop("plan_path"), budget=kwargs.pop("budget"),
                stages=parse_keep_schedule(schedule) if schedule else None, autoprune=autoprune,
                autoprune_mode=kwargs.pop("autoprune_mode", None),
            )  # fmt: skip
            return f(*args, **kwargs)

        return _compose(*options)(command)

    return decorate


class ImageSize(click.ParamType):
    """``WIDTHxHEIGHT`` in pixels (as image tools write sizes) -> ``(height, width)`` (as the model's code takes them)."""

    name = "WIDTHxHEIGHT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        width, sep, height = str(value).lower().partition("x")
        if not (sep and width.strip().isdigit() and height.strip().isdigit() and int(width) > 0 and int(height) > 0):
            from prune_core.errors import PruneExportError  # one line, as every other wrong value

            raise PruneExportError(f"--image-size {value!r} is not WIDTHxHEIGHT in pixels (e.g. 672x672)")
        return int(height), int(width)


def image_size_option(help: str) -> Decorator:
    return click.option("--image-size", type=ImageSize(), default=None, help=help)

"""How the command line prints: JSON, FLOPs, log lines on stderr, answers (whole, streamed or as JSON), and the
group that turns a user's error into one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from prune_core.errors import PruneExportError


class UserErrorGroup(click.Group):
    """A click group whose commands' :class:`~prune_core.errors.PruneExportError` print one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PruneExportError as exc:
            raise click.ClickException(str(exc)) from None


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def tflops(flops: float) -> str:
    return f"{flops / 1e12:.4f} TFLOPs" if flops >= 1e10 else f"{flops / 1e9:.4f} GFLOPs"


def log_err(message: str) -> None:
    click.echo(message, err=True)


def echo_answer(produce: Callable[[Callable[[str], None] | None], dict[str, Any]], stream: bool, as_json: bool) -> None:
    """Print the answer of ``produce(on_text)`` (``run``, ``ask``): as it streams, as JSON, or whole."""

    def echo_piece(piece: str) -> None:
        click.echo(piece, nl=False)

    result = produce(echo_piece if stream and not as_json else None)
    if as_json:
        echo_json(result)
    elif stream:
        click.echo()
    else:
        click.echo(result["answer"])

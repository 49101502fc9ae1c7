"""Helpers for CLI tests: run a command in click's runner, and check a user error is one clean line."""

from __future__ import annotations

from click.testing import CliRunner

from prune_export.cli import main


def run(*args: object) -> tuple[int, str]:
    """Exit code and output of ``prune-export ARGS``; an unexpected exception is re-raised."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_clean_error(code: int, output: str, needle: str) -> None:
    """A failing command printed exactly one line, containing ``needle``, and no traceback."""
    assert code != 0
    assert "Traceback" not in output
    assert needle in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output

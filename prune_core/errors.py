"""Errors.

:class:`PruneExportError` and its subclasses are problems a user can cause and fix (a wrong path, a
malformed plan, a budget out of range). Their message says what was received, what was expected and
which flag or file fixes it; the CLI prints it on one line and exits non-zero. Anything else that
escapes is an internal bug and keeps its traceback.
"""

from __future__ import annotations


class PruneExportError(Exception):
    """Base class of every error a user can cause; ``str(err)`` is the one-line message (the CLI exits 1)."""


class ModelLoadError(PruneExportError):
    """The model folder is missing, incomplete, or not a supported architecture."""


class PlanError(PruneExportError):
    """A plan file is malformed, out of schema, or inconsistent."""


class PlanMismatchError(PlanError):
    """A plan was made for a model with another architecture fingerprint."""


class BudgetError(PruneExportError):
    """A compute budget is outside (0, 1] or cannot be met by the plan."""


class DataError(PruneExportError):
    """A data/calibration file has malformed rows, missing fields or missing images."""


class JournalError(PruneExportError):
    """A search journal is corrupt or belongs to another search."""


class BuildError(PruneExportError):
    """An export or engine build failed a check (parity, lint) or could not run."""


class InternalError(RuntimeError):
    """A bug in prune-export itself (an invariant broke); never the user's fault."""


class BuildDirError(BuildError):
    """A build directory is missing, is not a build (no ``manifest.json``), or a file it records is missing
    or differs from the size/sha256 in ``manifest.json`` (truncated, modified, corrupted)."""


class ServeError(PruneExportError):
    """The local Triton server could not be prepared or started, or a request to a server failed."""

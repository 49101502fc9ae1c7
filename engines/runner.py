"""The one lifecycle of every runner (ONNX Runtime graph, build prefill, generation), as Polygraphy's runners
share one: ``activate()`` makes what the runner runs on (sessions, a tokenizer) and returns the runner,
``deactivate()`` lets it go, a ``with`` block does both, and first use activates. Activating an active runner
or deactivating an inactive one does nothing, and a runner used after it was let go activates again, so an
early return or an inner ``with`` block never leaves a runner that cannot run.
"""

from __future__ import annotations

import abc
from typing import TypeVar

R = TypeVar("R", bound="Runner")


class Runner(abc.ABC):
    """Base of the runners in :mod:`engines`: subclasses say whether they are active and how to become so."""

    @property
    @abc.abstractmethod
    def is_active(self) -> bool:
        """Whether what the runner runs on exists now."""

    @abc.abstractmethod
    def _activate(self) -> None:
        """Make what the runner runs on (called only when inactive)."""

    @abc.abstractmethod
    def _deactivate(self) -> None:
        """Let it go (called only when active)."""

    def activate(self: R) -> R:
        if not self.is_active:
            self._activate()
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()

    def __enter__(self: R) -> R:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

"""Run a build's prefill on ONNX Runtime, single graph or split (the AutoPrune runtime contract).

A ``single`` build has one ``prefill`` graph. A ``split`` build (AutoPrune for TensorRT, where the per-layer
keep counts must reach TopK as an int64 shape tensor) has ``prefill_head`` and ``prefill_tail``; between
them the host does what the in-graph table lookup does for ONNX Runtime (docs/build.md, "Runtime
contract"):

1. run ``prefill_head`` on the prompt inputs;
2. read ``autoprune.complexity`` (``I1``), compute ``k = max(k0 - gamma*I1, 0)`` and take the nearest row of
   the build's schedule table (:meth:`prune_core.autoprune.ScheduleTable.lookup`);
3. run ``prefill_tail`` on the head's ``tail.*`` outputs plus ``keep_counts`` / ``merged_counts`` (the
   row's ``K_l`` and ``c_l``, int64 ``[L-1]``).

:class:`PrefillRunner` does exactly that, so a split build can be checked and measured on CPU, and the
outputs it returns are those of the single graph (``autoprune.keep``/``autoprune.merged`` included).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engines.onnxruntime import OrtRunner, Provider, SessionFromOnnx
from engines.runner import Runner
from prune_core.autoprune import ScheduleTable, steepness
from prune_core.manifest import Manifest, load_schedule_table


def graph_runner(
    manifest: Manifest, build_dir: Path, name: str, *, provider: Provider = "auto", threads: int | None = None
) -> OrtRunner:
    """An :class:`OrtRunner` of one graph of a build, by its manifest name (its session is made when it is
    activated)."""
    return OrtRunner(SessionFromOnnx(manifest.graph_path(build_dir, name), provider=provider, threads=threads))


class BuildRunner(Runner):
    """A runner over one build directory: its folder, its manifest (loaded unless given) and the ONNX Runtime
    provider and threads its graphs' sessions get."""

    def __init__(
        self,
        build_dir: str | Path,
        *,
        provider: Provider = "auto",
        threads: int | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        self.build_dir = Path(build_dir)
        self.manifest = manifest or Manifest.load(self.build_dir)
        self._provider: Provider = provider
        self._threads = threads
        self._open()

    def _open(self) -> None:
        """What a subclass reads from the build when it is made (its graphs' runners, checks of the manifest)."""

    def graph(self, name: str) -> OrtRunner:
        """The runner of one of the build's graphs, by its manifest name (inactive until used)."""
        return graph_runner(self.manifest, self.build_dir, name, provider=self._provider, threads=self._threads)


class PrefillRunner(BuildRunner):
    """The prefill of one build directory as one call: ``infer(feeds) -> outputs by name``.

    A :class:`~engines.runner.Runner`: its graphs' sessions are made on :meth:`activate` (or a ``with``
    block, or first use) and dropped on :meth:`deactivate`.
    """

    def _open(self) -> None:
        if self.manifest.prefill_layout == "single":
            self.runners = {"prefill": self.graph("prefill")}
            self.table: ScheduleTable | None = None
        else:
            self.runners = {"head": self.graph("prefill_head"), "tail": self.graph("prefill_tail")}
            self.table = load_schedule_table(self.build_dir, self.manifest)

    @property
    def is_active(self) -> bool:
        return all(r.is_active for r in self.runners.values())

    def _activate(self) -> None:
        for runner in self.runners.values():
            runner.activate()

    def _deactivate(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    @property
    def provider(self) -> str:
        return next(iter(self.runners.values())).provider

    @property
    def input_names(self) -> list[str]:
        return list(self.input_metadata())

    def input_metadata(self) -> dict[str, tuple[np.dtype, tuple[int | str, ...]]]:
        """The prompt inputs (of ``prefill``, or of ``prefill_head`` for a split build)."""
        first = self.runners.get("prefill") or self.runners["head"]
        return first.input_metadata()

    def schedule_for(self, complexity: float) -> tuple[np.ndarray, np.ndarray]:
        """``keep_counts``/``merged_counts`` for a prompt whose layer-1 complexity is ``complexity``."""
        assert self.table is not None and self.manifest.autoprune is not None
        section = self.manifest.autoprune
        row = self.table.lookup(steepness(float(complexity), section["k0"], section["gamma"]))
        return np.asarray(row.keep, dtype=np.int64), np.asarray(row.merged, dtype=np.int64)

    def run_head(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Steps 1-2 of the split contract: the head's outputs, and the tail's feeds (state plus schedule)."""
        head = self.runners["head"].infer(feeds)
        keep, merged = self.schedule_for(float(head["autoprune.complexity"].reshape(-1)[0]))
        tail_feeds = {name: value for name, value in head.items() if name.startswith("tail.")}
        tail_feeds.update(keep_counts=keep, merged_counts=merged)
        return head, tail_feeds

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "prefill" in self.runners:
            return self.runners["prefill"].infer(feeds)
        head, tail_feeds = self.run_head(feeds)
        out = {name: value for name, value in head.items() if not name.startswith("tail.")}
        out.update(self.runners["tail"].infer(tail_feeds))
        out["autoprune.keep"], out["autoprune.merged"] = tail_feeds["keep_counts"], tail_feeds["merged_counts"]
        return out

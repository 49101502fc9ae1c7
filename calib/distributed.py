"""GSOP evaluations spread over Ray workers: the same numbers as the serial evaluator, sooner.

**How the work splits: calibration rows.** Each worker (a Ray actor holding the model on its own device,
one GPU per worker where there are GPUs) prepares one contiguous shard of the calibration rows once, and
every evaluation of an operation set runs on all shards at the same time; the driver joins the per-row
values in row order and takes their mean exactly as :meth:`~calib.evaluator.ModelEvaluator.evaluate`
does. Why rows rather than the candidates of one greedy step:

* the search is mostly sequential: the baseline, the free-block binary searches and every greedy trial
  are single evaluations that decide what comes next; only ranking sweeps hold independent candidates.
  Splitting rows makes *every* evaluation parallel, splitting candidates only the sweeps;
* the value of a row does not depend on which worker computed it, and the driver sums the rows in the
  serial order, so the plan is the serial plan (the same float operations, given the same per-evaluation
  thread count);
* each worker keeps prefix-reuse states for its own rows only: memory per worker falls with the worker
  count instead of every worker holding states for every row;
* shards are cut on batch boundaries (``--batch-size``), so batched evaluation forms the same batches as
  in a serial run.

It scales to as many workers as there are batches of rows (500 rows: far beyond 8 GPUs).

**Failures.** A worker that dies (``kill -9``, a lost node) surfaces as a Ray actor error on the driver.
Its shards move to the surviving worker with the fewest rows, which prepares them and redoes the
evaluation in flight; values already returned are kept. Only when every worker is gone does the search
stop, with its journal intact for ``--resume``. The journal is the driver's (see :mod:`calib.search`).

Ray is optional (``pip install "prune-export[ray]"``); nothing here imports it until a pool starts.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_core.errors import PruneExportError
from prune_core.ops import Operation
from prune_core.spec import GroupSizes

from .evaluator import EvaluatorStats, MetricInfo

OpSet = frozenset[Operation]
Log = Callable[[str], None]

_log = logging.getLogger(__name__)

#: How long the driver waits for workers to start before it says what it is waiting for (and again after).
START_NOTICE_SECONDS = 60.0


class RayUnavailableError(PruneExportError):
    """Workers were asked for but Ray is not installed."""


class WorkersLostError(PruneExportError):
    """Every Ray worker of a search died."""


#: Ray advertises a local instance on the machine's outward address even when asked for 127.0.0.1, unless
#: its cluster mode is off (the switch is named for the platforms where it is off by default). Read when
#: ``ray`` is first imported, and inherited by the processes the instance starts.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def require_ray(local: bool = False) -> Any:
    """The ``ray`` module, or one clear line on how to get it. ``local``: the caller starts a local
    instance, which then stays on 127.0.0.1 (if ``ray`` was not imported before)."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            "--workers/--ray-address need Ray, which is not installed; install the extra with "
            "pip install \"prune-export[ray]\" (or pip install ray), or search with --workers 1"
        ) from None
    return ray


@dataclass(frozen=True)
class WorkerConfig:
    """What each worker loads: the model (on ``device`` in ``dtype``) and the calibration file."""

    model_dir: str
    calib_path: str
    metric: str
    limit: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    prefix_reuse: bool = True
    batch_size: int = 1
    threads: int = 1


class EvaluationWorker:
    """One worker's state: the model and the evaluators of the shards it holds (a Ray actor's class).

    Also usable in-process (tests, debugging): nothing in it depends on Ray.
    """

    def __init__(self, config: WorkerConfig) -> None:
        import torch

        from exporter.adapters import load_adapter
        from prune_core.device import resolve_device, torch_dtype

        if not config.device.startswith("cuda"):
            torch.set_num_threads(config.threads)
        self.config = config
        self.adapter = load_adapter(Path(config.model_dir), dtype=torch_dtype(config.dtype),
                                    device=resolve_device(config.device))
        self.evaluators: dict[int, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def prepare(self, shard: int, rows: Sequence[int]) -> tuple[list[tuple[int, ...]], str]:
        """Prepare the calibration rows of ``shard``; returns their group sizes and the data fingerprint."""
        from .evaluator import CalibrationSet, ModelEvaluator

        c = self.config
        calib = CalibrationSet.load(self.adapter, c.calib_path, c.metric, limit=c.limit, indices=list(rows))
        self.evaluators[shard] = ModelEvaluator(self.adapter, calib, prefix_reuse=c.prefix_reuse,
                                                batch_size=c.batch_size)
        sizes = [(s.sys, s.img_key, s.img_rest, s.txt) for s in (item.prompt.sizes for item in calib.items)]
        return sizes, calib.fingerprint

    def evaluate(self, shard: int, op_sets: Sequence[OpSet]) -> tuple[list[list[float]], float, int, int]:
        """Per-row values of ``shard`` for every op set, with the seconds spent and layers run/full."""
        ev = self.evaluators[shard]
        before = (ev.stats.seconds, ev.stats.layers_run, ev.stats.layers_full)
        values = [ev.evaluate_rows(ops) for ops in op_sets]
        return (values, ev.stats.seconds - before[0], ev.stats.layers_run - before[1],
                ev.stats.layers_full - before[2])


def shard_rows(rows: int, workers: int, batch_size: int = 1) -> list[list[int]]:
    """Contiguous shards of ``range(rows)``, cut on multiples of ``batch_size``, as even as batches allow.

    At most one shard per batch: with fewer batches than workers some workers get no shard (they stay
    ready to take over one).
    """
    if rows < 1 or workers < 1 or batch_size < 1:
        raise ValueError(f"shard_rows needs rows, workers and batch_size >= 1, got {rows}, {workers}, {batch_size}")
    batches = math.ceil(rows / batch_size)
    n = min(workers, batches)
    shards = []
    for i in range(n):
        lo, hi = i * batches // n, (i + 1) * batches // n
        shards.append(list(range(lo * batch_size, min(hi * batch_size, rows))))
    return shards


@dataclass
class _Actor:
    handle: Any
    pid: int
    alive: bool = True
    rows: int = 0


@dataclass
class RayStats(EvaluatorStats):
    """The evaluator's counts over all workers (``seconds``: summed over workers), plus the calls and
    ``critical_seconds``: the slowest shard of each call, summed over calls, so the driver's wall time minus
    it is what Ray and the driver add."""

    calls: int = 0
    critical_seconds: float = 0.0


class RayEvaluator:
    """The search's :class:`~calib.search.BatchEvaluator` over a pool of Ray workers (see the module doc).

    Starts a local Ray instance on 127.0.0.1 with ``workers`` worker slots unless Ray is already running
    in this process or ``address`` names a cluster to join. Use as a context manager: :meth:`close` stops
    the workers (and the local instance it started).
    """

    def __init__(self, config: WorkerConfig, workers: int, rows: int, metric: MetricInfo, *,
                 address: str | None = None, log: Log = lambda message: None) -> None:
        if workers < 1:
            raise PruneExportError(f"--workers must be >= 1, got {workers}")
        ray = require_ray(local=address is None)
        self._ray = ray
        self.config = config
        self.metric = metric
        self.log = log
        self.rows = rows
        self.stats = RayStats()
        self._started_ray = False
        gpu = config.device.startswith("cuda")
        if not ray.is_initialized():
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            else:
                kwargs: dict[str, Any] = {}
                if not gpu:
                    kwargs["num_cpus"] = workers * config.threads
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                         logging_level=logging.WARNING, **kwargs)
            self._started_ray = True
        try:
            self._start(workers, gpu)
        except BaseException:
            self.close()
            raise

    # -- pool ------------------------------------------------------------------------------------------
    def _start(self, workers: int, gpu: bool) -> None:
        ray = self._ray
        remote = ray.remote(EvaluationWorker).options(
            num_cpus=self.config.threads, num_gpus=1 if gpu else 0, max_restarts=0, max_concurrency=1,
        )
        # each worker on a GPU sees only its own (Ray sets CUDA_VISIBLE_DEVICES): it runs on "cuda"
        config = self.config
        if gpu:
            config = WorkerConfig(**{**config.__dict__, "device": "cuda"})
        handles = [remote.remote(config) for _ in range(workers)]
        pids = self._wait_all([h.pid.remote() for h in handles], what="workers to start")
        self.actors = [_Actor(h, pid) for h, pid in zip(handles, pids, strict=True)]
        self.shards = shard_rows(self.rows, workers, self.config.batch_size)
        self.owner: dict[int, int] = {}
        prepared: dict[int, tuple[list[tuple[int, ...]], str]] = {}
        for s in range(len(self.shards)):
            self.owner[s] = s
            self.actors[s].rows += len(self.shards[s])
        self._run_all(lambda a, s: a.prepare.remote(s, self.shards[s]), prepared, prepare=False)
        self.sizes = [GroupSizes(*sz) for s in range(len(self.shards)) for sz in prepared[s][0]]
        prints = {fp for _, fp in prepared.values()}
        if len(prints) != 1:
            raise PruneExportError(
                f"the Ray workers read different calibration data ({sorted(prints)}); every worker must see "
                f"the same {self.config.calib_path} (a shared file system or the same copy on every node)"
            )
        self.fingerprint = prints.pop()

    def _wait_all(self, refs: list[Any], what: str) -> list[Any]:
        ray = self._ray
        start = time.monotonic()
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=START_NOTICE_SECONDS)
            if pending:
                free = ray.available_resources()
                self.log(f"still waiting for {len(pending)} of {len(refs)} {what} after "
                         f"{time.monotonic() - start:.0f} s (Ray reports free: {free.get('CPU', 0):g} CPU, "
                         f"{free.get('GPU', 0):g} GPU; each worker needs {self.config.threads} CPU"
                         f"{' and 1 GPU' if self.config.device.startswith('cuda') else ''})")
        return [self._get(r) for r in refs]

    def _get(self, ref: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, PruneExportError):
                raise cause from None
            raise

    @property
    def workers_total(self) -> int:
        return len(self.actors)

    @property
    def workers_alive(self) -> int:
        return sum(a.alive for a in self.actors)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring, and the kill tests)."""
        return [a.pid for a in self.actors if a.alive]

    def _run_all(self, call: Callable[[Any, int], Any], results: dict[int, Any], prepare: bool) -> None:
        """Run ``call(actor_handle, shard)`` for every shard on its owner; a dead owner's shard moves to a
        survivor (prepared there first) and runs again. Fills ``results[shard]``."""
        ray = self._ray
        refs: dict[Any, int] = {}
        for s in range(len(self.shards)):
            refs[call(self.actors[self.owner[s]].handle, s)] = s
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            ref = ready[0]
            s = refs.pop(ref)
            try:
                results[s] = self._get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                survivor = self._reassign(s, exc)
                handle = self.actors[survivor].handle
                if prepare:
                    handle.prepare.remote(s, self.shards[s])  # ordered before the call on the same actor
                refs[call(handle, s)] = s

    def _reassign(self, shard: int, exc: BaseException) -> int:
        dead = self.owner[shard]
        actor = self.actors[dead]
        if actor.alive:
            actor.alive = False
            self.log(f"Ray worker {dead} (pid {actor.pid}) died ({type(exc).__name__}); "
                     f"{self.workers_alive} of {self.workers_total} left")
        alive = [i for i, a in enumerate(self.actors) if a.alive]
        if not alive:
            raise WorkersLostError(
                f"all {self.workers_total} Ray workers died (last: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); every finished evaluation is in the journal: "
                "rerun the same command with --resume"
            )
        survivor = min(alive, key=lambda i: (self.actors[i].rows, i))
        rows = self.shards[shard]
        self.owner[shard] = survivor
        actor.rows -= len(rows)
        self.actors[survivor].rows += len(rows)
        self.log(f"rows {rows[0]}-{rows[-1]} moved to Ray worker {survivor} (pid {self.actors[survivor].pid})")
        return survivor

    # -- the evaluator interface -------------------------------------------------------------------------
    def evaluate(self, ops: OpSet) -> float:
        return self.evaluate_many([ops])[0]

    def evaluate_many(self, op_sets: Sequence[OpSet]) -> list[float]:
        op_sets = [frozenset(o) for o in op_sets]
        if not op_sets:
            return []
        results: dict[int, tuple[list[list[float]], float, int, int]] = {}
        self._run_all(lambda a, s: a.evaluate.remote(s, op_sets), results, prepare=True)
        out = []
        for j in range(len(op_sets)):
            values = [v for s in range(len(self.shards)) for v in results[s][0][j]]
            out.append(float(sum(values) / len(values)))
        self.stats.evaluations += len(op_sets)
        self.stats.calls += 1
        self.stats.critical_seconds += max(r[1] for r in results.values())
        for _, seconds, run, full in results.values():
            self.stats.seconds += seconds
            self.stats.layers_run += run
            self.stats.layers_full += full
        return out

    # -- teardown ------------------------------------------------------------------------------------------
    def close(self) -> None:
        ray = self._ray
        for a in getattr(self, "actors", []):
            if a.alive:
                try:
                    ray.kill(a.handle)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Continuous batching of greedy decoding over per-request pruned KV caches.

One :class:`Scheduler` serves many requests with one build: it admits a request between decode steps (its
prefill runs alone, its caches join the batch), runs one decode step for every sequence of the batch,
hands each sequence its new token as it comes, and retires a sequence at its EOS, its ``max_new_tokens`` or
its cancellation. ``prune-export eval --batch-size``, the local runtime and the Triton orchestrator all use
this one scheduler; only the engine that runs the graphs differs (:class:`DecodeEngine`).

**Caches of different lengths in one step.** A pruned prefill leaves each layer of each request with its
own number of KV tokens (AutoPrune: a different count per request and per layer). The batch holds, per
layer, ``key/value [B, kv_heads, L_l, hd]`` and ``position [B, L_l]`` with ``L_l`` the longest sequence at
that layer; a shorter sequence is padded on the left with position ``-1``, which the decode graph masks
out of attention and out of the sequence's next position (``exporter/decode.py``). Each sequence's tokens
stay contiguous at the right: a step appends one column to every row, a joining sequence is padded to the
batch (or the batch to it), and when sequences retire the columns no remaining sequence uses are cut.

**Memory.** The batch is bounded by ``max_batch`` sequences and, optionally, a KV budget in bytes: the
most the batch's padded caches can grow to before its sequences finish (every layer at its longest
sequence's length + that sequence's remaining tokens, times the batch size). A request that does not fit
waits, prefilled, at the head of the queue (first come, first served) until retirements make room: its
``queue_ms`` (submitted -> prefill) and ``budget_wait_ms`` (prefilled -> joined the batch) say how long. A request that cannot fit even alone fails with a message naming the
budget. Only this one waiting request is held beside the budget.

The module needs numpy and the standard library only: ``prune-export deploy`` copies it next to the Triton
orchestrator, whose Python environment has no prune-export.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

KV_KINDS = ("key", "value", "position")
#: Position of a padded cache slot: masked out by the decode graph.
PAD_POSITION = -1


class BatchingError(Exception):
    """A request the scheduler cannot serve (it does not fit the KV budget, the scheduler was closed)."""


@dataclass
class Prefilled:
    """One request's prefill: the last prompt token's logits and every layer's caches (batch 1)."""

    logits: np.ndarray  # [vocab]
    cache: list[Any]  # per layer: key [1, kv_heads, n_l, hd], value (same), position [1, n_l]


class DecodeEngine(Protocol):
    """What the scheduler needs from a build's runtime."""

    def decode(self, input_ids: np.ndarray, cache: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One step: ``input_ids [B, 1]`` and the caches (numpy arrays or values :meth:`decode` returned)
        -> ``logits [B, vocab]`` and the caches one token longer."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray:
        """A cache value :meth:`decode` returned, as a numpy array."""
        ...


@dataclass(eq=False)
class Request:
    """One greedy generation. ``prefill`` runs when the request is admitted; ``on_token`` receives each
    token id as it comes (EOS is not a token of the answer); ``on_finish`` runs once, with ``None`` or the
    exception that ended the request. ``is_cancelled`` is polled between steps."""

    prefill: Callable[[], Prefilled]
    max_new_tokens: int
    eos: frozenset[int] = frozenset()
    ignore_eos: bool = False
    on_token: Callable[[Request, int], None] | None = None
    on_finish: Callable[[Request, BaseException | None], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    tag: Any = None  # the caller's own handle (a Triton response sender, a row index)
    # filled by the scheduler
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "length", "cancelled", "error"
    error: BaseException | None = None  # what ended it, with finish_reason "error"
    submitted: float = 0.0
    admitted: float | None = None  # its prefill started
    prefilled_at: float | None = None  # its prefill ended
    joined: float | None = None  # it joined the decode batch (after waiting for the KV budget, if it had to)
    first_token: float | None = None
    finished: float | None = None
    kv_tokens_per_layer: list[int] = field(default_factory=list)  # after the prefill

    @property
    def queue_ms(self) -> float:
        return 0.0 if self.admitted is None else (self.admitted - self.submitted) * 1e3

    @property
    def budget_wait_ms(self) -> float:
        """How long its decoding waited, prefilled, for room in the KV budget."""
        if self.joined is None or self.prefilled_at is None:
            return 0.0
        return (self.joined - self.prefilled_at) * 1e3

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.submitted) * 1e3

    @property
    def latency_ms(self) -> float | None:
        return None if self.finished is None else (self.finished - self.submitted) * 1e3


def _rows(cache: Sequence[np.ndarray], layer: int) -> int:
    return int(cache[3 * layer + 2].shape[1])


def slot_bytes(cache: Sequence[np.ndarray], num_layers: int) -> list[int]:
    """Bytes of one sequence's key + value + position at one cache slot, per layer."""
    out = []
    for layer in range(num_layers):
        key, value, pos = cache[3 * layer : 3 * layer + 3]
        out.append(key.shape[1] * key.shape[3] * key.itemsize + value.shape[1] * value.shape[3] * value.itemsize
                   + pos.itemsize)  # fmt: skip
    return out


def batch_kv_bytes(sequences: Sequence[tuple[Sequence[int], int]], slot_bytes: Sequence[int]) -> int:
    """The most a batch's padded caches can grow to: ``sequences`` are (KV tokens per layer now, tokens
    still to come) of each sequence; every layer is as long as its longest sequence will get, for every row.
    """
    if not sequences:
        return 0
    total = 0
    for layer, per_slot in enumerate(slot_bytes):
        total += max(tokens[layer] + remaining for tokens, remaining in sequences) * per_slot
    return total * len(sequences)


class PaddedCache:
    """The caches of the sequences in one decode batch: per layer ``key/value [B, kv_heads, L_l, hd]`` and
    ``position [B, L_l]``, each row right-aligned and left-padded with position -1 (module docstring)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.arrays: list[np.ndarray] | None = None

    @property
    def batch(self) -> int:
        return 0 if self.arrays is None else int(self.arrays[0].shape[0])

    @staticmethod
    def _pad(array: np.ndarray, length: int, axis: int, fill: int | float) -> np.ndarray:
        missing = length - array.shape[axis]
        if missing == 0:
            return array
        shape = list(array.shape)
        shape[axis] = missing
        return np.concatenate([np.full(shape, fill, dtype=array.dtype), array], axis=axis)

    def add(self, cache: Sequence[np.ndarray]) -> None:
        """Append one sequence's caches (batch 1) as the last row, padding whichever side is shorter."""
        if len(cache) != 3 * self.num_layers:
            raise ValueError(f"a sequence's cache has {len(cache)} tensors, expected {3 * self.num_layers}")
        if self.arrays is None:
            self.arrays = [np.ascontiguousarray(a) for a in cache]
            return
        out = []
        for layer in range(self.num_layers):
            length = max(_rows(self.arrays, layer), _rows(cache, layer))
            for kind, old, new in zip(KV_KINDS, self.arrays[3 * layer : 3 * layer + 3], cache[3 * layer : 3 * layer + 3], strict=True):
                axis, fill = (1, PAD_POSITION) if kind == "position" else (2, 0)
                if new.dtype != old.dtype:
                    raise ValueError(f"layer {layer} {kind}: a sequence's cache is {new.dtype}, the batch's {old.dtype}")
                out.append(np.concatenate([self._pad(old, length, axis, fill), self._pad(new, length, axis, fill)], axis=0))
        self.arrays = out

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order) and cut the leading columns none of them uses."""
        assert self.arrays is not None
        if not rows:
            self.arrays = None
            return
        index = np.asarray(rows, dtype=np.int64)
        out = []
        for layer in range(self.num_layers):
            pos = self.arrays[3 * layer + 2][index]
            used = int((pos >= 0).sum(axis=1).max())
            start = pos.shape[1] - used
            key, value = self.arrays[3 * layer], self.arrays[3 * layer + 1]
            out += [np.ascontiguousarray(key[index, :, start:]), np.ascontiguousarray(value[index, :, start:]),
                    np.ascontiguousarray(pos[:, start:])]  # fmt: skip
        self.arrays = out


@dataclass
class _Slot:
    request: Request
    next_token: int
    kv_tokens: list[int]  # per layer, its own tokens now (prefill + decoded so far)


class OrtDecodeEngine:
    """A build's decode graph on an ONNX Runtime session, as the scheduler's engine (and the batch-1
    runtime's decode step). The caches a step returns stay ONNX Runtime values (in the GPU's memory under
    the CUDA provider) and the next step binds them as they are (IO binding): only the token ids go in and
    the logits come out; numpy arrays (a new batch's caches) are bound from host memory."""

    def __init__(self, session: Any, num_layers: int) -> None:
        self.session = session
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.inputs = [f"past.{layer}.{kind}" for layer in range(num_layers) for kind in KV_KINDS]
        self.outputs = [o.name for o in session.get_outputs()]

    def decode(self, input_ids: np.ndarray, cache: list[Any]) -> tuple[np.ndarray, list[Any]]:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        for name, value in zip(self.inputs, cache, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), list(values[1:])

    @staticmethod
    def to_numpy(value: Any) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()


class Scheduler:
    """Continuous batching of :class:`Request` s over one :class:`DecodeEngine` (module docstring).

    Drive it from one thread: :meth:`run` (until every submitted request finished) or :meth:`serve`
    (until :meth:`stop`); :meth:`submit` and :meth:`stop` may be called from any thread.
    """

    def __init__(
        self,
        engine: DecodeEngine,
        num_layers: int,
        *,
        max_batch: int,
        kv_budget_bytes: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if kv_budget_bytes is not None and kv_budget_bytes < 1:
            raise ValueError(f"the KV budget must be >= 1 byte, got {kv_budget_bytes}")
        self.engine = engine
        self.num_layers = num_layers
        self.max_batch = max_batch
        self.kv_budget_bytes = kv_budget_bytes
        self.clock = clock
        self._queue: deque[Request] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._deadline = 0.0
        self._waiting: tuple[Request, Prefilled] | None = None  # prefilled, held until the budget has room
        self._slots: list[_Slot] = []
        self._cache = PaddedCache(num_layers)
        self._live: list[Any] | None = None  # the engine's own values of the last step (no copy back)
        self._slot_bytes: list[int] | None = None
        self.batch_sizes: list[int] = []  # sequences per decode step, in order

    # -- any thread ------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        request.submitted = self.clock()
        with self._lock:
            if self._stopping:
                raise BatchingError("the scheduler is shutting down; send the request again once it is back")
            self._queue.append(request)
            self._lock.notify_all()
        return request

    def stop(self, drain_s: float = 0.0) -> None:
        """Refuse new requests and let :meth:`serve` return: once every request in flight has finished, or
        after ``drain_s`` seconds, or after the current step with ``drain_s=0`` (what is left then waits for
        :meth:`fail_all`)."""
        with self._lock:
            self._stopping = True
            self._deadline = self.clock() + drain_s
            self._lock.notify_all()

    @property
    def active(self) -> int:
        return len(self._slots)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + (self._waiting is not None)

    def _busy(self) -> bool:
        """A request is queued, waiting for the budget or decoding (call with the lock held)."""
        return bool(self._queue or self._waiting is not None or self._slots)

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until every submitted request has finished."""
        while self.step():
            pass

    def serve(self, idle_wait_s: float = 0.1, on_idle: Callable[[], None] | None = None) -> None:
        """Serve until :meth:`stop`; idle, wait for :meth:`submit`. ``on_idle`` runs each time the last
        request in flight has finished."""
        busy = False
        while True:
            with self._lock:
                idle = not self._busy()
            if idle and busy and on_idle is not None:
                on_idle()
            with self._lock:
                while not self._stopping and not self._busy():
                    self._lock.wait(idle_wait_s)
                busy = self._busy()
                if self._stopping and (not busy or self.clock() >= self._deadline):
                    return
            self.step()

    def step(self) -> bool:
        """Admit what fits, run one decode step, retire what finished. False when nothing is left."""
        self._drop_cancelled()
        self._admit()
        if self._slots:
            self._decode()
        with self._lock:
            return self._busy()

    def fail_all(self, error: BaseException) -> None:
        """End every request not finished yet with ``error`` (shutdown, a broken engine)."""
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
            waiting, self._waiting = self._waiting, None
        for request in queued + ([waiting[0]] if waiting else []):
            self._finish(request, "error", error)
        self._retire(list(range(len(self._slots))), "error", error)

    # -- internals -------------------------------------------------------------------------------------
    def _finish(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        request.finish_reason = reason
        request.error = error
        request.finished = self.clock()
        if request.on_finish is not None:
            request.on_finish(request, error)

    def _emit(self, request: Request, token: int) -> bool:
        """Hand ``token`` to ``request``; True when the request goes on."""
        now = self.clock()
        if request.first_token is None:
            request.first_token = now
        if token in request.eos and not request.ignore_eos:
            self._finish(request, "eos")
            return False
        request.tokens.append(token)
        if request.on_token is not None:
            request.on_token(request, token)
        if len(request.tokens) >= request.max_new_tokens:
            self._finish(request, "length")
            return False
        return True

    def _cancelled(self, request: Request) -> bool:
        try:
            return bool(request.is_cancelled and request.is_cancelled())
        except Exception:  # a sender that cannot say any more is a client gone
            return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            queued = [r for r in self._queue if self._cancelled(r)]
            for request in queued:
                self._queue.remove(request)
            waiting = self._waiting
            if waiting is not None and self._cancelled(waiting[0]):
                self._waiting = None
                queued.append(waiting[0])
        for request in queued:
            self._finish(request, "cancelled")
        gone = [i for i, slot in enumerate(self._slots) if self._cancelled(slot.request)]
        if gone:
            self._retire(gone, "cancelled")

    def _materialize(self) -> None:
        """The batch's caches as numpy arrays (after a step they are the engine's own values)."""
        if self._live is not None:
            self._cache.arrays = [self.engine.to_numpy(v) for v in self._live]
            self._live = None

    def _retire(self, rows: list[int], reason: str, error: BaseException | None = None) -> None:
        if not rows:
            return
        gone = set(rows)
        finished = [self._slots[i].request for i in rows]
        keep = [i for i in range(len(self._slots)) if i not in gone]
        self._slots = [self._slots[i] for i in keep]
        if self._cache.arrays is not None or self._live is not None:
            self._materialize()
            self._cache.keep(keep)
        for request in finished:
            if request.finish_reason is None:
                self._finish(request, reason, error)

    def _need_bytes(self, slots: list[_Slot]) -> int:
        """The most a batch of ``slots`` can make its padded caches grow to (module docstring)."""
        if self._slot_bytes is None:
            return 0
        return batch_kv_bytes([(s.kv_tokens, s.request.max_new_tokens - len(s.request.tokens)) for s in slots],
                              self._slot_bytes)  # fmt: skip

    def _admit(self) -> None:
        while len(self._slots) < self.max_batch:
            if self._waiting is None:
                with self._lock:
                    if not self._queue:
                        return
                    request = self._queue.popleft()
                request.admitted = self.clock()
                try:
                    prefilled = request.prefill()
                except Exception as exc:  # this request's failure, not the batch's
                    self._finish(request, "error", exc)
                    continue
                request.prefilled_at = self.clock()
                cache = prefilled.cache = [self.engine.to_numpy(v) for v in prefilled.cache]
                request.kv_tokens_per_layer = [_rows(cache, layer) for layer in range(self.num_layers)]
                if self._slot_bytes is None:
                    self._slot_bytes = slot_bytes(cache, self.num_layers)
                token = int(np.argmax(prefilled.logits))
                if not self._emit(request, token):
                    continue  # answered by its prefill alone (EOS or one token)
                self._waiting = (request, prefilled)
            request, prefilled = self._waiting
            slot = _Slot(request, int(request.tokens[-1]), list(request.kv_tokens_per_layer))
            if self.kv_budget_bytes is not None:
                alone = self._need_bytes([slot])
                if alone > self.kv_budget_bytes:
                    self._waiting = None
                    self._finish(request, "error", BatchingError(
                        f"the request needs {_mb(alone)} of KV cache ({sum(request.kv_tokens_per_layer)} "
                        f"KV tokens over {self.num_layers} layers + {request.max_new_tokens} new tokens), more than the "
                        f"KV budget of {_mb(self.kv_budget_bytes)}: raise the budget or lower max_new_tokens"))  # fmt: skip
                    continue
                if self._need_bytes([*self._slots, slot]) > self.kv_budget_bytes:
                    return  # waits, prefilled, for retirements
            self._waiting = None
            request.joined = self.clock()
            self._materialize()
            self._cache.add(prefilled.cache)
            self._slots.append(slot)

    def _decode(self) -> None:
        ids = np.asarray([[s.next_token] for s in self._slots], dtype=np.int64)
        cache = self._live if self._live is not None else self._cache.arrays
        assert cache is not None
        try:
            logits, out = self.engine.decode(ids, cache)
        except Exception as exc:  # the batch cannot go on: every sequence in it gets the error
            self._live = None
            self._retire(list(range(len(self._slots))), "error", exc)
            return
        self._live = list(out)
        self._cache.arrays = None
        self.batch_sizes.append(len(self._slots))
        done = []
        for i, slot in enumerate(self._slots):
            slot.kv_tokens = [n + 1 for n in slot.kv_tokens]
            token = int(np.argmax(logits[i]))
            if self._emit(slot.request, token):
                slot.next_token = token
            else:
                done.append(i)
        self._retire(done, "done")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{math.ceil(n / 1024)} KiB"

"""The continuous-batching scheduler (engines/batching.py) against a hand-written reference.

A toy engine stands in for the decode graph: its "model" is integer arithmetic over the cached keys of each
layer, masked by position exactly as the decode graph masks padding (a slot with a negative position does
not exist). The reference runs each request alone on plain Python lists, never padded, never batched: if
the scheduler pads on the wrong side, trims a column a sequence still uses, mixes up rows when one retires
or hands a token to the wrong request, the answers differ. The toy engine also asserts, at every step, the
layout the scheduler promises: each row's tokens contiguous at the right, no column that no row uses.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engines.batching import BatchingError, PaddedCache, Prefilled, Request, Scheduler

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 3, 2, 4, 97


def _next_token(keys_per_layer: list[list[int]], token: int) -> int:
    """The toy model: the next token from the previous one and every layer's cached keys."""
    total = token * 31
    for layer, keys in enumerate(keys_per_layer):
        total += (layer + 1) * sum(keys) + 7 * len(keys)
    return total % VOCAB


def _new_key(token: int, position: int, layer: int) -> int:
    return (token * 13 + position * 5 + layer) % 101


class ToyEngine:
    """The toy model over padded batches, checking the scheduler's layout on the way."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.seen_batches: list[int] = []

    def decode(self, input_ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        self.steps += 1
        if self.fail_at_step is not None and self.steps == self.fail_at_step:
            raise RuntimeError("the decode graph failed")
        batch = input_ids.shape[0]
        self.seen_batches.append(batch)
        out: list[np.ndarray] = []
        keys_per_row: list[list[list[int]]] = [[] for _ in range(batch)]
        for layer in range(LAYERS):
            key, value, pos = cache[3 * layer : 3 * layer + 3]
            assert key.shape[:2] == (batch, KV_HEADS) and pos.shape == (batch, key.shape[2])
            valid = pos >= 0
            assert valid[:, 0].any(), "a leading column no sequence uses was not cut"
            for b in range(batch):
                used = int(valid[b].sum())
                assert valid[b, pos.shape[1] - used :].all(), "a sequence's tokens are not contiguous at the right"
                assert (key[b, :, : pos.shape[1] - used] == 0).all() and (value[b, :, : pos.shape[1] - used] == 0).all()
            position = np.where(valid, pos, -1).max(axis=1) + 1
            new = np.array([_new_key(int(t), int(p), layer) for t, p in zip(input_ids[:, 0], position, strict=True)])
            new_k = np.broadcast_to(new[:, None, None, None], (batch, KV_HEADS, 1, HEAD_DIM)).astype(key.dtype)
            keys = np.concatenate([key, new_k], axis=2)
            positions = np.concatenate([pos, position[:, None]], axis=1)
            out += [keys, np.concatenate([value, new_k], axis=2), positions]
            for b in range(batch):
                keys_per_row[b].append([int(k) for k in keys[b, 0, positions[b] >= 0, 0]])
        logits = np.zeros((batch, VOCAB), dtype=np.float32)
        for b in range(batch):
            logits[b, _next_token(keys_per_row[b], int(input_ids[b, 0]))] = 1.0
        return logits, out

    @staticmethod
    def to_numpy(value: np.ndarray) -> np.ndarray:
        return value


def _prompt(seed: int) -> tuple[list[list[int]], list[list[int]], int]:
    """A request's prefill: per layer its own number of keys (a pruned prefill) and positions, and the
    first token."""
    rng = np.random.RandomState(seed)
    lengths = [int(n) for n in rng.randint(2, 12, size=LAYERS)]
    keys = [[int(k) for k in rng.randint(1, 50, size=n)] for n in lengths]
    positions = [sorted(int(p) for p in rng.choice(40, size=n, replace=False)) for n in lengths]
    return keys, positions, int(rng.randint(VOCAB))


def _prefill(seed: int) -> Prefilled:
    keys, positions, first = _prompt(seed)
    cache = []
    for k, p in zip(keys, positions, strict=True):
        block = np.broadcast_to(np.asarray(k, dtype=np.float32)[None, None, :, None], (1, KV_HEADS, len(k), HEAD_DIM))
        cache += [block.copy(), block.copy(), np.asarray([p], dtype=np.int64)]
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[first] = 1.0
    return Prefilled(logits, cache)


def reference(seed: int, max_new_tokens: int, eos: frozenset[int] = frozenset()) -> list[int]:
    """The request alone, on lists: the greedy loop of a batch-1 runtime."""
    keys, positions, token = _prompt(seed)
    out: list[int] = []
    for step in range(max_new_tokens):
        if token in eos:
            break
        out.append(token)
        if step + 1 == max_new_tokens:
            break
        for layer in range(LAYERS):
            position = max(positions[layer]) + 1
            keys[layer].append(_new_key(token, position, layer))
            positions[layer].append(position)
        token = _next_token(keys, token)
    return out


def _request(seed: int, max_new_tokens: int, **kw) -> Request:
    return Request(lambda: _prefill(seed), max_new_tokens, **kw)


def test_padded_cache_pads_on_the_left_and_cuts_unused_columns() -> None:
    cache = PaddedCache(1)
    a = [np.ones((1, 1, 2, 1)), np.ones((1, 1, 2, 1)), np.array([[0, 1]])]
    b = [np.full((1, 1, 4, 1), 2.0), np.full((1, 1, 4, 1), 2.0), np.array([[0, 1, 2, 3]])]
    cache.add(a)
    cache.add(b)
    assert cache.arrays[2].tolist() == [[-1, -1, 0, 1], [0, 1, 2, 3]]
    assert cache.arrays[0][:, 0, :, 0].tolist() == [[0, 0, 1, 1], [2, 2, 2, 2]]
    cache.keep([0])  # the long one retires: its two extra columns go
    assert cache.arrays[2].tolist() == [[0, 1]] and cache.arrays[0].shape == (1, 1, 2, 1)
    cache.keep([])
    assert cache.batch == 0


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_batched_answers_equal_each_request_alone(max_batch: int) -> None:
    """Seven requests, different prompt lengths per layer and answer lengths: with a batch of 3 some join
    while others are mid-answer, and finish at different steps."""
    lengths = [9, 3, 12, 5, 1, 7, 10]
    engine = ToyEngine()
    scheduler = Scheduler(engine, LAYERS, max_batch=max_batch)
    streamed: dict[int, list[int]] = {}
    mid_answer: list[int] = []  # requests that joined while another one was part-way through its answer

    def prefill(seed: int) -> Prefilled:
        if any(0 < len(streamed.get(s, [])) < lengths[s] for s in range(len(lengths)) if s != seed):
            mid_answer.append(seed)
        return _prefill(seed)

    requests = [scheduler.submit(Request(lambda seed=seed: prefill(seed), n, tag=seed,
                                         on_token=lambda r, t: streamed.setdefault(r.tag, []).append(t)))
                for seed, n in enumerate(lengths)]  # fmt: skip
    scheduler.run()
    for seed, (request, n) in enumerate(zip(requests, lengths, strict=True)):
        assert request.tokens == reference(seed, n), seed
        assert streamed.get(seed, []) == request.tokens
        assert request.finish_reason == "length"
    decoding = sum(n > 1 for n in lengths)  # a one-token answer is its prefill's alone
    assert max(engine.seen_batches) == min(max_batch, decoding)
    assert sum(engine.seen_batches) == sum(n - 1 for n in lengths)  # every decode step ran once per token
    if 1 < max_batch < decoding:
        assert mid_answer, "no request joined a batch mid-answer"
    assert scheduler.active == 0 and scheduler.pending == 0


def test_a_request_that_reaches_eos_leaves_early_and_the_others_go_on() -> None:
    full = reference(2, 12)
    eos = frozenset({full[4]}) - set(full[:4])
    assert eos, full
    scheduler = Scheduler(ToyEngine(), LAYERS, max_batch=4)
    early = scheduler.submit(_request(2, 12, eos=eos))
    others = [scheduler.submit(_request(seed, 12)) for seed in (0, 5, 6)]
    scheduler.run()
    assert early.tokens == full[:4] and early.finish_reason == "eos"
    for seed, request in zip((0, 5, 6), others, strict=True):
        assert request.tokens == reference(seed, 12)
    ignored = Scheduler(ToyEngine(), LAYERS, max_batch=2)
    request = ignored.submit(_request(2, 12, eos=eos, ignore_eos=True))
    ignored.run()
    assert request.tokens == full


def test_a_cancelled_request_frees_its_row() -> None:
    cancel = threading.Event()
    engine = ToyEngine()
    scheduler = Scheduler(engine, LAYERS, max_batch=4)

    def on_token(request: Request, token: int) -> None:
        if len(request.tokens) == 3:
            cancel.set()

    gone = scheduler.submit(_request(3, 20, on_token=on_token, is_cancelled=cancel.is_set))
    rest = [scheduler.submit(_request(seed, 10)) for seed in (1, 4)]
    scheduler.run()
    assert gone.finish_reason == "cancelled" and gone.tokens == reference(3, 20)[:3]
    assert [r.tokens for r in rest] == [reference(1, 10), reference(4, 10)]
    assert engine.seen_batches[3:] and max(engine.seen_batches[3:]) == 2  # its row left the batch
    # A sender that cannot answer any more counts as a client gone.
    broken = Scheduler(ToyEngine(), LAYERS, max_batch=2)

    def raising() -> bool:
        raise RuntimeError("stream closed")

    request = broken.submit(_request(0, 5, is_cancelled=raising))
    broken.run()
    assert request.finish_reason == "cancelled" and request.tokens == []


def test_the_kv_budget_makes_a_request_wait() -> None:
    """The budget holds two of these requests at their full length: the third waits, prefilled, until one
    retires, and its queue time says so."""
    ticks = iter(range(10**6))
    engine = ToyEngine()
    new_tokens = 6
    first = _prefill(0)
    slot = sum(KV_HEADS * HEAD_DIM * 4 * 2 + 8 for _ in range(LAYERS))  # key + value (fp32) + position, per slot
    longest = [max(_prefill(s).cache[3 * layer].shape[2] for s in (0, 1)) + new_tokens - 1 for layer in range(LAYERS)]
    two = 2 * sum(n * (KV_HEADS * HEAD_DIM * 4 * 2 + 8) for n in longest)
    assert slot > 0 and first.cache[0].dtype == np.float32
    scheduler = Scheduler(engine, LAYERS, max_batch=8, kv_budget_bytes=two, clock=lambda: float(next(ticks)))
    requests = [scheduler.submit(_request(seed, new_tokens)) for seed in (0, 1, 0)]
    scheduler.run()
    assert max(engine.seen_batches) == 2
    assert [r.tokens for r in requests] == [reference(0, new_tokens), reference(1, new_tokens), reference(0, new_tokens)]
    assert requests[2].joined > min(requests[0].finished, requests[1].finished)  # it waited for the budget
    assert requests[2].budget_wait_ms > max(requests[0].budget_wait_ms, requests[1].budget_wait_ms)
    # One byte less and the second request waits for the first one too.
    tight = ToyEngine()
    scheduler = Scheduler(tight, LAYERS, max_batch=8, kv_budget_bytes=two - 1)
    requests = [scheduler.submit(_request(seed, new_tokens)) for seed in (0, 1)]
    scheduler.run()
    assert max(tight.seen_batches) == 1
    assert [r.tokens for r in requests] == [reference(0, new_tokens), reference(1, new_tokens)]


def test_a_request_larger_than_the_budget_fails_alone() -> None:
    scheduler = Scheduler(ToyEngine(), LAYERS, max_batch=4, kv_budget_bytes=100)
    big = scheduler.submit(_request(0, 5))
    ok = Scheduler(ToyEngine(), LAYERS, max_batch=4)
    assert ok.submit(_request(0, 5))
    scheduler.run()
    assert big.finish_reason == "error" and isinstance(big.error, BatchingError)
    assert "KV budget of 1 KiB" in str(big.error) and "raise the budget" in str(big.error)


def test_engine_and_prefill_failures_end_only_the_requests_they_touch() -> None:
    engine = ToyEngine(fail_at_step=2)
    scheduler = Scheduler(engine, LAYERS, max_batch=2)
    finished: list[tuple[int, str | None]] = []

    def note(request: Request, error: BaseException | None) -> None:
        finished.append((request.tag, None if error is None else str(error)))

    def bad_prefill() -> Prefilled:
        raise ValueError("the image processor rejected the input")

    a = scheduler.submit(_request(0, 6, tag=0, on_finish=note))
    b = scheduler.submit(Request(bad_prefill, 6, tag=1, on_finish=note))
    c = scheduler.submit(_request(1, 6, tag=2, on_finish=note))
    later = scheduler.submit(_request(4, 6, tag=3, on_finish=note))
    scheduler.run()
    assert b.finish_reason == "error" and "image processor" in str(b.error)
    assert a.finish_reason == c.finish_reason == "error" and "decode graph failed" in str(a.error)
    assert later.tokens == reference(4, 6) and later.finish_reason == "length"  # the batch after it works
    assert sorted(tag for tag, _ in finished) == [0, 1, 2, 3]  # each told once


def test_serve_in_a_thread_takes_requests_from_other_threads() -> None:
    scheduler = Scheduler(ToyEngine(), LAYERS, max_batch=4)
    loop = threading.Thread(target=scheduler.serve, kwargs={"idle_wait_s": 0.01})
    loop.start()
    done: dict[int, threading.Event] = {seed: threading.Event() for seed in range(6)}
    requests = {}

    def client(seed: int) -> None:
        requests[seed] = scheduler.submit(_request(seed, 8, on_finish=lambda r, e, s=seed: done[s].set()))

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    assert all(event.wait(10) for event in done.values())
    scheduler.stop()
    loop.join(5)
    assert not loop.is_alive()
    assert {seed: r.tokens for seed, r in requests.items()} == {seed: reference(seed, 8) for seed in range(6)}
    with pytest.raises(BatchingError, match="shutting down"):
        scheduler.submit(_request(0, 3))


def test_fail_all_answers_every_request_still_open() -> None:
    scheduler = Scheduler(ToyEngine(), LAYERS, max_batch=1)
    requests = [scheduler.submit(_request(seed, 20)) for seed in range(3)]
    scheduler.step()  # one admitted and decoding, two queued
    scheduler.fail_all(BatchingError("the server is shutting down"))
    assert [r.finish_reason for r in requests] == ["error"] * 3
    assert all("shutting down" in str(r.error) for r in requests)
    assert not scheduler.step()

"""Live: deploy tiny builds, ``prune-export serve`` them on loopback, ask over HTTP and gRPC.

One server for the module serves five repositories: a dense build (``dense``), an AutoPrune build
(``ap``), a split AutoPrune build deployed with ``--stream --decode-in bls`` (``apsplit``, decoupled, decode
steps by BLS), a LLaVA-NeXT AutoPrune build (``next``: any-resolution images, each packed from its own
tiles by the served model) and the AutoPrune build deployed with ``--max-batch 8`` (``batch``: continuous
batching, decode steps inside the served model). The reference
answers come from ``prune-export run``'s workflow on the same build directories, in this process; the
served ones from the orchestrator model inside Triton's Python backend. Loops are bounded, the server is
stopped by PID (SIGTERM) at the end, and no server or model process may outlive it.

Skips only where the server environment (the nvidia-pytriton wheel) cannot be installed.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engines.triton.client import TritonAsker
from engines.triton.server import ServerEnvironment, descendants
from prune_core.errors import ServeError
from prune_export.cli import main
from prune_export.workflows.generate import run_build

pytestmark = pytest.mark.slow
NEW_TOKENS = 12
QUESTIONS = ["What color is the circle?", "How many shapes are there, and where are they?", "Is it big?"]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def server_env() -> ServerEnvironment:
    try:
        return ServerEnvironment().ensure()
    except ServeError as exc:
        pytest.skip(f"the local Triton server cannot be installed here: {exc}")


@pytest.fixture(scope="module")
def prompts(demo_data: Path) -> list[tuple[Path, str]]:
    images = sorted((demo_data.parent / "images").iterdir())
    return [(images[i % len(images)], q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def expected(triton_builds: dict[str, Path], prompts) -> dict[str, list[str]]:
    """``prune-export run``'s answers, per served model and prompt."""
    builds = {"dense": triton_builds["dense"], "ap": triton_builds["autoprune"], "apsplit": triton_builds["split"]}
    return {model: [run_build(build, image, q, max_new_tokens=NEW_TOKENS, provider="cpu")["answer"] for image, q in prompts]
            for model, build in builds.items()}  # fmt: skip


@pytest.fixture(scope="module")
def server(server_env, triton_builds: dict[str, Path], next_triton_build: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("triton-live")
    repos = []
    builds = {**triton_builds, "next": next_triton_build}
    for model, build, extra in (("dense", "dense", []), ("ap", "autoprune", []), ("apsplit", "split", ["--stream", "--decode-in", "bls"]),
                                ("next", "next", []), ("batch", "autoprune", ["--max-batch", "8", "--stream"])):  # fmt: skip
        repo = root / f"repo-{model}"
        result = CliRunner().invoke(main, ["deploy", str(builds[build]), "--repo", str(repo), "--name", model, *extra])
        assert result.exit_code == 0, result.output
        repos.append(str(repo))
    http, grpc, metrics = _free_ports(3)
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed at teardown
    cmd = [sys.executable, "-m", "prune_export.cli", "serve", *repos, "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    info = {"http": f"http://127.0.0.1:{http}", "grpc": f"grpc://127.0.0.1:{grpc}", "process": process,
            "log": root / "server.log", "root": root}  # fmt: skip
    deadline = time.monotonic() + 180
    while True:
        try:
            with TritonAsker(info["http"], model="dense") as asker:
                if asker._client.is_server_ready():
                    break
        except ServeError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not become ready: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield info
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    log.close()


def _ask(url: str, model: str, image: Path, question: str, **kwargs) -> str:
    with TritonAsker(url, model=model) as asker:
        return asker.ask(image.read_bytes(), question, max_new_tokens=NEW_TOKENS, **kwargs).answer


def test_served_answers_equal_run_over_http_and_grpc(server, prompts, expected) -> None:
    assert len({a for answers in expected.values() for a in answers}) > 1  # the prompts tell builds apart
    for model in ("dense", "ap"):
        for (image, question), want in zip(prompts, expected[model], strict=True):
            assert _ask(server["http"], model, image, question) == want, (model, question)
            assert _ask(server["grpc"], model, image, question) == want, (model, question)


def test_a_next_build_packs_each_images_own_tiles(server, next_triton_build: Path, tmp_path: Path) -> None:
    """LLaVA-NeXT: a square, a wide and a tall image (three pinpoints, three visual counts) answered as
    ``prune-export run`` answers them; an image with fewer visual tokens than the AutoPrune build's N0 is a
    bad request, as ``run`` refuses it."""
    rng = np.random.RandomState(5)
    answers, counts = [], set()
    for width, height in ((64, 64), (150, 60), (50, 140)):
        path = tmp_path / f"{width}x{height}.png"
        Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8")).save(path)
        for question in QUESTIONS[:2]:
            want = run_build(next_triton_build, path, question, max_new_tokens=NEW_TOKENS, provider="cpu")
            counts.add(want["prompt_tokens"])
            assert _ask(server["http"], "next", path, question) == want["answer"], (width, height, question)
            answers.append(want["answer"])
    assert len(counts) >= 3 and len(set(answers)) > 1  # the images gave other token counts; the answers differ
    Image.fromarray((rng.rand(10, 1000, 3) * 255).astype("uint8")).save(tmp_path / "thin.png")
    with pytest.raises(ServeError, match="fewer than the AutoPrune build's N0 = 50"):
        _ask(server["http"], "next", tmp_path / "thin.png", QUESTIONS[0])


def test_a_decoupled_model_streams_the_answer(server, prompts, expected) -> None:
    for (image, question), want in zip(prompts, expected["apsplit"], strict=True):
        got: list[str] = []
        with TritonAsker(server["grpc"], model="apsplit") as asker:
            assert asker.decoupled
            result = asker.ask(image.read_bytes(), question, max_new_tokens=NEW_TOKENS, on_text=got.append)
        assert "".join(got) == result.answer == want
        assert result.ttft_ms is not None and result.ttft_ms <= result.latency_ms
        if len(want.split()) > 2:
            assert len(got) > 1  # pieces as they come, not one final string
    with pytest.raises(ServeError, match="ask it with --protocol grpc"):
        _ask(server["http"], "apsplit", *prompts[0])


def test_eight_concurrent_clients(server, prompts, expected) -> None:
    jobs = [(c, r) for c in range(8) for r in range(5)]

    def client(index: int) -> list[bool]:
        url = server["http"] if index % 2 else server["grpc"]
        model = ("dense", "ap")[index % 2 if index < 4 else (index // 2) % 2]
        oks = []
        with TritonAsker(url, model=model) as asker:
            for r in range(5):
                image, question = prompts[(index + r) % len(prompts)]
                answer = asker.ask(image.read_bytes(), question, max_new_tokens=NEW_TOKENS).answer
                oks.append(answer == expected[model][(index + r) % len(prompts)])
        return oks

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8), timeout=300))
    assert sum(len(r) for r in results) == len(jobs) and all(all(r) for r in results)


def test_sixteen_concurrent_clients_share_decode_steps(server, prompts, expected) -> None:
    """The AutoPrune build deployed with ``--max-batch 8``: sixteen gRPC clients at once, two questions each,
    every answer equal to ``run``'s (requests join and leave the batch between decode steps). That the
    steps really carried several sequences is in the server log the last test reads."""

    def client(index: int) -> list[bool]:
        oks = []
        with TritonAsker(server["grpc"], model="batch") as asker:
            assert asker.decoupled
            for r in range(2):
                k = (index + r) % len(prompts)
                image, question = prompts[k]
                oks.append(asker.ask(image.read_bytes(), question, max_new_tokens=NEW_TOKENS).answer == expected["ap"][k])
        return oks

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16), timeout=300))
    assert [all(r) for r in results] == [True] * 16
    server["batched"] = True
    with pytest.raises(ServeError, match="--max-batch > 1\\): ask it with --protocol grpc"):
        _ask(server["http"], "batch", *prompts[0])


def test_a_cancelled_request_leaves_the_batch(server, prompts, expected) -> None:
    """A client that cancels its stream mid-answer: the served model drops it between steps (the server
    log counts it) and the requests beside it and after it are answered."""
    import queue

    import tritonclient.grpc as grpcclient

    image, question = prompts[0]
    client = grpcclient.InferenceServerClient(server["grpc"].removeprefix("grpc://"))
    with TritonAsker(server["grpc"], model="batch") as asker:
        inputs = asker._inputs(image.read_bytes(), question, 1000, True)  # 1000 tokens: it would run for a while
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("batch", inputs)
    with ThreadPoolExecutor(2) as pool:
        beside = pool.submit(_ask, server["grpc"], "batch", image, question)
        result, error = got.get(timeout=60)  # its first text piece: it is decoding, ~1000 steps to go
        assert error is None, error
        client.stop_stream(cancel_requests=True)
        assert beside.result(timeout=120) == expected["ap"][0]
    client.close()
    assert _ask(server["grpc"], "batch", *prompts[1]) == expected["ap"][1]
    server["cancelled"] = True


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, prompts, expected) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    image, question = prompts[0]
    client = httpclient.InferenceServerClient(server["http"].removeprefix("http://"))

    def send(fields: dict[str, tuple[np.ndarray, str]]) -> str:
        inputs = []
        for name, (value, dtype) in fields.items():
            tensor = httpclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        with pytest.raises(InferenceServerException) as err:
            client.infer("ap", inputs)
        assert err.value.status() == "400", err.value  # a bad request, not a server failure
        return err.value.message()

    img = (np.array([image.read_bytes()], dtype=np.object_), "BYTES")
    q = (np.array([question.encode()], dtype=np.object_), "BYTES")
    assert "question" in send({"image": img})
    assert "image" in send({"question": q})
    assert "not an image" in send({"image": (np.array([b"definitely not a PNG"], dtype=np.object_), "BYTES"), "question": q})
    assert "question is empty" in send({"image": img, "question": (np.array([b"   "], dtype=np.object_), "BYTES")})
    bomb = io.BytesIO()  # a PNG of a few KB that declares 200 megapixels: refused from its header
    Image.new("1", (20000, 10000)).save(bomb, format="PNG")
    message = send({"image": (np.array([bomb.getvalue()], dtype=np.object_), "BYTES"), "question": q})
    assert "20000 x 10000 = 200,000,000 pixels, more than the limit of 50,000,000" in message
    message = send({"image": img, "question": (np.array([b"caf\xe9?"], dtype=np.object_), "BYTES")})
    assert "not UTF-8 text (byte 0xe9 at position 3)" in message
    long_question = (np.array([("word " * 5000).encode()], dtype=np.object_), "BYTES")
    assert "more than the build's bound of 4096" in send({"image": img, "question": long_question})
    for bad in (0, -3, 100_000):
        message = send({"image": img, "question": q, "max_new_tokens": (np.array([bad], dtype=np.int32), "INT32")})
        assert "max_new_tokens must be between 1 and 1024" in message and str(bad) in message
    message = send({"image": img, "question": (np.array([7], dtype=np.int32), "INT32")})
    assert "'question' data-type is 'INT32'" in message and "expects 'BYTES'" in message
    assert client.is_server_ready() and client.is_model_ready("ap")
    client.close()
    assert _ask(server["http"], "ap", image, question) == expected["ap"][0]


def test_ask_cli(server, prompts, expected) -> None:
    import json

    image, question = prompts[1]
    result = CliRunner().invoke(main, ["ask", server["http"], "--model", "dense", "--image", str(image),
                                       "--question", question, "--max-new-tokens", str(NEW_TOKENS), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["answer"] == expected["dense"][1] and out["latency_ms"] > 0 and out["protocol"] == "http"
    streamed = CliRunner().invoke(main, ["ask", server["grpc"], "--model", "apsplit", "--image", str(image),
                                         "--question", question, "--max-new-tokens", str(NEW_TOKENS), "--stream"])  # fmt: skip
    assert streamed.exit_code == 0 and streamed.output == expected["apsplit"][1] + "\n"
    several = CliRunner().invoke(main, ["ask", server["http"], "--image", str(image), "--question", question])
    assert several.exit_code == 1 and "name one with --model" in several.output
    closed = _free_ports(1)[0]
    down = CliRunner().invoke(main, ["ask", f"http://127.0.0.1:{closed}", "--image", str(image), "--question", "hi"])
    assert down.exit_code == 1 and "cannot reach a Triton server" in down.output and len(down.output.strip().splitlines()) == 1


def test_sigterm_stops_the_server_and_every_model_process(server) -> None:
    """Last in the module: stop the server by PID and look for anything left behind."""
    process = server["process"]
    children = descendants(process.pid)
    assert len(children) >= 1 + 25  # tritonserver and one stub per model instance (5 repositories x 5 models)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    # The batching model's own account, logged each time it fell idle: decode steps that carried up to its
    # --max-batch of sequences, and the cancelled request.
    log = server["log"].read_text()
    line = [x for x in log.splitlines() if "batch:" in x and "decode steps" in x][-1]
    largest = int(re.search(r"largest (\d+)", line).group(1))
    if server.get("batched"):
        assert largest == 8, line
    if server.get("cancelled"):
        assert "cancelled 1" in line, line
    time.sleep(1.0)
    alive = [pid for pid in children if _alive(pid)]
    assert not alive, f"still running after SIGTERM: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone in all but name
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False

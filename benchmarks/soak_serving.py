"""Batched serving under soak and faults: a bounded script on loopback (issue: many requests at once).

A tiny AutoPrune build (the ``tiny`` demo model, made here once) is deployed with ``--max-batch 8`` and
served by the local ``tritonserver``. Three phases, each bounded in time, each printing what it saw:

1. **Soak**: ``--requests`` requests back to back from 8 gRPC clients; every answer must equal
   ``prune-export run``'s. The resident memory of the server and all its model processes is read (from
   /proc) after a warm-up and after the soak: growth must stay under 10 %.
2. **A graph model's process killed mid-load**: 16 clients with long answers in flight (8 decoding, 8
   waiting for a batch slot), then SIGKILL to the prefill model's backend process (``--kill``; the decode
   graph runs inside the served model itself). Each request must end with an answer or a clean error that
   names the model; afterwards requests must be answered again (Triton restarts the stub) or refused with
   a clear error, never hang.
3. **SIGTERM during load**: 8 requests in flight, SIGTERM to the server. Every request must end (answer or
   clean error) and the server must exit before its exit timeout + 10 s.

Exit status 0 when every check held. Run it alone:

    python benchmarks/soak_serving.py [--requests 500] [--out out/soak-serving]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.triton.client import TritonAsker  # noqa: E402
from engines.triton.server import LocalTritonServer, descendants  # noqa: E402
from exporter.demo import build_demo_model  # noqa: E402
from prune_core.errors import ServeError  # noqa: E402
from prune_core.plan import AutoPruneSection  # noqa: E402
from prune_export.workflows.build import BuildSettings, build  # noqa: E402
from prune_export.workflows.deploy import deploy  # noqa: E402
from prune_export.workflows.generate import run_build  # noqa: E402
from prune_export.workflows.selection import PlanChoice  # noqa: E402

NAME = "soak"
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Where is the square?"]


def rss_mib(pid: int) -> float:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def stub_of(pid: int, model: str) -> int | None:
    for p in descendants(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"/{model}/" in cmd or f"{model}_0_0" in cmd:
            return p
    return None


def ask(url: str, image: bytes, question: str, new_tokens: int, ignore_eos: bool = False, timeout: float = 120) -> tuple[str, str]:
    """("ok", answer) or ("error", message); never raises."""
    try:
        with TritonAsker(url, model=NAME, timeout=timeout) as asker:
            return "ok", asker.ask(image, question, max_new_tokens=new_tokens, ignore_eos=ignore_eos).answer
    except ServeError as exc:
        return "error", str(exc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("out/soak-serving"))
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--kill", default="prefill", help="the graph model whose process phase 2 kills")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "tiny-model"
    if not (model / "config.json").is_file():
        build_demo_model(model, "tiny", seed=0)
    build_dir = args.out / "build"
    if not (build_dir / "manifest.json").is_file():
        build(model, build_dir, PlanChoice(tokens=AutoPruneSection(tokens=4)), BuildSettings(overwrite=True), lambda m: None)
    repo = args.out / "repo"
    deploy(build_dir, repo, name=NAME, max_batch=8, overwrite=True)
    images = []
    for seed in range(3):
        rng = np.random.RandomState(seed)
        path = args.out / f"image{seed}.png"
        Image.fromarray((rng.rand(70, 90, 3) * 255).astype("uint8")).save(path)
        images.append(path)
    prompts = [(images[i], q) for i, q in enumerate(QUESTIONS)]
    expected = [run_build(build_dir, image, q, max_new_tokens=args.new_tokens, provider="cpu")["answer"] for image, q in prompts]
    report: dict = {}
    ok = True

    def start() -> tuple[LocalTritonServer, object]:
        log = open(args.out / "server.log", "a")  # noqa: SIM115
        server = LocalTritonServer([repo], http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2, log_file=log)
        server.start()
        server.wait_ready()
        return server, log

    # -- 1. soak --------------------------------------------------------------------------------------
    server, log = start()
    url = f"grpc://{server.grpc_url}"
    data = [(p.read_bytes(), q) for p, q in prompts]
    for i in range(16):
        ask(url, *data[i % 3], args.new_tokens)
    before = rss_mib(server.process.pid)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: (i, ask(url, *data[i % 3], args.new_tokens)), range(args.requests)))
    wall = time.perf_counter() - t0
    after = rss_mib(server.process.pid)
    wrong = [(i, r) for i, r in results if r != ("ok", expected[i % 3])]
    growth = after / before - 1
    report["soak"] = {"requests": args.requests, "seconds": wall, "wrong": len(wrong), "rss_before_mib": before,
                      "rss_after_mib": after, "growth": growth}  # fmt: skip
    print(f"soak: {args.requests} requests in {wall:.0f} s ({args.requests / wall:.1f} req/s), {len(wrong)} wrong; "
          f"server RSS {before:.0f} -> {after:.0f} MiB ({growth:+.1%})")  # fmt: skip
    ok &= not wrong and growth < 0.10

    # -- 2. a graph model's process killed mid-load -------------------------------------------------
    victim = f"{NAME}_{args.kill}"
    stub = stub_of(server.process.pid, victim)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, url, *data[i % 3], 600, True) for i in range(16)]
        time.sleep(1.0)
        if stub is not None:
            os.kill(stub, signal.SIGKILL)
        outcomes = [f.result(timeout=300) for f in futures]
    clean = all(kind == "ok" or victim in message for kind, message in outcomes)
    after_kill = [ask(url, *data[i % 3], args.new_tokens, timeout=60) for i in range(3)]
    recovered = all(r == ("ok", expected[i]) for i, r in enumerate(after_kill))
    refused_clearly = all(kind == "error" and message for kind, message in after_kill)
    report["kill"] = {"stub_pid": stub, "in_flight": [k if k == "ok" else m for k, m in outcomes],
                      "after": after_kill, "recovered": recovered}  # fmt: skip
    print(f"kill: {victim} process {stub} killed with 16 requests in flight: {sum(k == 'ok' for k, _ in outcomes)} answered, "
          f"{sum(k == 'error' for k, _ in outcomes)} errors{' naming the model' if clean else ' NOT naming the model'}; "
          f"afterwards {'answered again' if recovered else ('refused: ' + after_kill[0][1] if refused_clearly else after_kill)}")  # fmt: skip
    for kind, message in outcomes:
        if kind == "error":
            print(f"  e.g. {message}")
            break
    ok &= stub is not None and clean and (recovered or refused_clearly)

    # -- 3. SIGTERM during load -----------------------------------------------------------------------
    if not recovered:  # start afresh so that phase 3 measures shutdown, not the broken model
        server.stop()
        log.close()
        server, log = start()
        url = f"grpc://{server.grpc_url}"
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, url, *data[i % 3], 64, True, 60) for i in range(8)]
        time.sleep(1.0)
        t0 = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(15 + 10)
        except subprocess.TimeoutExpired:
            code = None
        exit_s = time.perf_counter() - t0
        outcomes = [f.result(timeout=90) for f in futures]
    server.stop()
    log.close()
    ended = all(kind in ("ok", "error") for kind, _ in outcomes)
    report["sigterm"] = {"exit_code": code, "exit_seconds": exit_s, "outcomes": [k if k == "ok" else m for k, m in outcomes]}
    print(f"sigterm: server exited with {code} after {exit_s:.1f} s; in flight: {sum(k == 'ok' for k, _ in outcomes)} "
          f"answered, {sum(k == 'error' for k, _ in outcomes)} errors")  # fmt: skip
    for kind, message in outcomes:
        if kind == "error":
            print(f"  e.g. {message}")
            break
    ok &= code is not None and ended
    report["passed"] = bool(ok)
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"{'PASSED' if ok else 'FAILED'}; wrote {args.out / 'results.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

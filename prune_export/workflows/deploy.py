"""Serving a build with Triton Inference Server: ``prune-export deploy``, ``serve`` and ``ask``.

- :func:`deploy` writes a standard Triton model repository from a verified build
  (:class:`engines.triton.repository.RepositoryFromBuild`);
- :func:`serve` runs a local ``tritonserver`` on 127.0.0.1 in the foreground until SIGTERM or Ctrl-C
  (:class:`engines.triton.server.LocalTritonServer`), then stops it and every model process;
- :func:`ask` sends one image and question to a served model (:class:`engines.triton.client.TritonAsker`).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prune_core import defaults
from prune_core.errors import DataError, ServeError
from prune_core.manifest import Manifest


def deploy(
    build_dir: Path, repo_dir: Path, *, name: str = "prune_export", instances: int = 1, device: str = "cpu",
    max_new_tokens: int | None = None, max_image_pixels: int = defaults.MAX_IMAGE_PIXELS, stream: bool = False,
    max_batch: int = 1, kv_budget_mb: float | None = None, decode_in: str | None = None, overwrite: bool = False, log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``build_dir`` as the Triton repository ``repo_dir``; what was written."""
    from engines.triton.repository import RepositoryFromBuild

    started = time.perf_counter()
    manifest = Manifest.load(build_dir, verify="full")
    writer = RepositoryFromBuild(build_dir, repo_dir, name=name, instances=instances, kind=device,  # type: ignore[arg-type]
                                 max_new_tokens=max_new_tokens, max_image_pixels=max_image_pixels, stream=stream,
                                 max_batch=max_batch, kv_budget_mb=kv_budget_mb, decode_in=decode_in,
                                 overwrite=overwrite,
                                 manifest=manifest, log=log)  # fmt: skip
    repo = writer()
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    return {"repository": str(repo), "model": name, "models": models, "stream": stream, "max_batch": writer.max_batch,
            "decoupled": writer.decoupled, "decode_in": writer.decode_in,
            "max_new_tokens": writer.max_new_tokens, "seconds": time.perf_counter() - started}  # fmt: skip


def serve(
    repos: Sequence[Path], *, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
    env_dir: Path | None = None, log: Callable[[str], None] = lambda message: None,
) -> int:  # fmt: skip
    """Serve ``repos`` until SIGTERM/SIGINT or until the server stops; the server's exit code."""
    from engines.triton.server import LocalTritonServer, ServerEnvironment

    server = LocalTritonServer(repos, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                               env=ServerEnvironment(env_dir, log=log), log=log)  # fmt: skip

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.start()
        server.wait_ready()
        log(f"serving {', '.join(server.models)}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
            f"metrics http://127.0.0.1:{metrics_port}/metrics (SIGTERM or Ctrl-C stops)")  # fmt: skip
        assert server.process is not None
        return server.process.wait()
    except KeyboardInterrupt:
        log("stopping the server")
        return 0
    finally:
        code = server.stop()
        signal.signal(signal.SIGTERM, previous)
        if code not in (0, None, -signal.SIGTERM):
            log(f"tritonserver exited with code {code}")


def ask(
    url: str, image_path: Path, question: str, *, protocol: str | None = None, model: str | None = None,
    max_new_tokens: int | None = None, wait: float = 0.0, on_text: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Ask a served model ``question`` about the image file at ``image_path``; the answer and latency.

    ``wait`` > 0 retries reaching the server for that many seconds (a server that is still starting).
    """
    from engines.triton.client import TritonAsker

    from .open_build import require_file

    image_file = require_file(image_path)
    if not question.strip():
        raise DataError("the question is empty; pass --question with the text to ask about the image")
    image = image_file.read_bytes()
    deadline = time.monotonic() + wait
    while True:
        try:
            asker = TritonAsker(url, protocol=protocol, model=model)  # type: ignore[arg-type]
            break
        except ServeError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
    with asker:
        result = asker.ask(image, question, max_new_tokens=max_new_tokens, on_text=on_text)
    return result.to_dict()

"""A local Triton Inference Server for a model repository (``prune-export serve``), on 127.0.0.1.

The server is the ``tritonserver`` binary that nvidia-pytriton bundles (Triton 2.51, Python backend only).
It and the Python stub processes run in their own environment, :class:`ServerEnvironment`, made once and
reused: a virtual environment with ``numpy<2`` (the stub corrupts tensors under numpy 2) and
nvidia-pytriton installed without its dependencies, which sees this environment's packages (ONNX Runtime,
transformers, tokenizers, Pillow) *after* its own, so the orchestrator preprocesses and decodes with the
very versions ``prune-export run`` uses. Nothing is installed into this environment.

:class:`LocalTritonServer` prepares a backend directory for each start (the Python backend, the stub for
this Python version, and ``onnxruntime/model.py``: the Python-based backend that serves the repository's
``onnxruntime`` graph models with ONNX Runtime), starts the server on loopback with explicit ports, waits
until every model is ready, and stops it with SIGTERM (Triton then unloads every model and ends the stub
processes). The server process also receives SIGTERM if this process dies.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from prune_core.errors import ServeError
from prune_core.io import staged_directory

from .repository import MODELS_DIR

PYTRITON = "nvidia-pytriton==0.7.0"
STUB_NUMPY = "numpy>=1.23,<2"
ENV_MARKER = "prune-export-env.json"
ENV_VARIABLE = "PRUNE_EXPORT_TRITON_ENV"


def default_env_dir() -> Path:
    """``$PRUNE_EXPORT_TRITON_ENV``, else ``~/.cache/prune-export/triton-server-py3.X-HASH``.

    HASH names this Python environment: each prune-export installation gets its own server environment,
    which sees that installation's packages.
    """
    if os.environ.get(ENV_VARIABLE):
        return Path(os.environ[ENV_VARIABLE])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    return cache / "prune-export" / f"triton-server-py{sys.version_info.major}.{sys.version_info.minor}-{tag}"


class ServerEnvironment:
    """The environment ``tritonserver`` and its Python stubs run in (see the module docstring)."""

    def __init__(self, path: str | Path | None = None, *, log: Callable[[str], None] = lambda m: None) -> None:
        self.path = Path(path) if path is not None else default_env_dir()
        self.log = log
        paths = sysconfig.get_paths()
        self.host_sites = list(dict.fromkeys([paths["purelib"], paths["platlib"]]))
        self.pyver = f"{sys.version_info.major}.{sys.version_info.minor}"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return self.path / "lib" / f"python{self.pyver}" / "site-packages"

    @property
    def pytriton(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.pytriton / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    def _marker(self) -> dict:
        return {"pytriton": PYTRITON, "numpy": STUB_NUMPY, "python": self.pyver}

    def ready(self) -> bool:
        try:
            marker = json.loads((self.path / ENV_MARKER).read_text())
        except (OSError, ValueError):
            return False
        return marker == self._marker() and self.tritonserver.is_file() and self.python.exists()

    def ensure(self) -> ServerEnvironment:
        """Create the environment if it is missing or stale (one download of ~75 MB, then reused)."""
        if not self.ready():
            if self.path.exists() and not (self.path / ENV_MARKER).exists() and any(self.path.iterdir()):
                raise ServeError(
                    f"{self.path} exists and is not a prune-export server environment; remove it, or pass "
                    f"another --env (or set {ENV_VARIABLE})"
                )
            self.log(f"preparing the server environment in {self.path} ({PYTRITON}, {STUB_NUMPY}): once, ~1 min")
            with staged_directory(self.path) as work:
                self._create(work)
        self._link_host()
        return self

    def _create(self, work: Path) -> None:
        def run(cmd: list[str], what: str) -> None:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                raise ServeError(
                    f"cannot {what} ({tail}); the local server needs {PYTRITON} and {STUB_NUMPY} from the "
                    f"package index, or an environment prepared elsewhere passed with --env"
                )

        run([sys.executable, "-m", "venv", "--without-pip", str(work)], "create the server environment")
        python = work / "bin" / "python"
        run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", PYTRITON, STUB_NUMPY], f"install {PYTRITON}")  # fmt: skip
        (work / ENV_MARKER).write_text(json.dumps(self._marker(), indent=2) + "\n")

    def _link_host(self) -> None:
        """Let the environment see this one's packages after its own (its numpy<2 wins)."""
        pth = self.site_packages / "zz_prune_export_host.pth"
        line = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in self.host_sites) + "\n"
        if not pth.exists() or pth.read_text() != line:
            pth.write_text(line)

    def stub(self) -> Path:
        stub = self.pytriton / "python_backend_stubs" / self.pyver / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServeError(f"{PYTRITON} has no Python backend stub for Python {self.pyver}; use Python 3.8-3.13")
        return stub


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the server when the process that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _gpus_present() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


class LocalTritonServer:
    """``tritonserver`` on 127.0.0.1 for one or more repositories (see the module docstring). Use as a context manager,
    or :meth:`start` / :meth:`wait_ready` / :meth:`stop`."""

    def __init__(
        self,
        repos: str | Path | Sequence[str | Path],
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        env: ServerEnvironment | None = None,
        log_file: IO[str] | None = None,
        log: Callable[[str], None] = lambda m: None,
    ) -> None:
        listed = [repos] if isinstance(repos, (str, Path)) else list(repos)
        self.repos = [Path(r).resolve() for r in listed]
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        if len(set(self.ports.values())) != 3:
            raise ServeError(f"--http-port, --grpc-port and --metrics-port must differ, got {self.ports}")
        self.env = env or ServerEnvironment(log=log)
        self.log_file = log_file
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self._backends: Path | None = None
        self.models = self._check_repository()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def _check_repository(self) -> list[str]:
        models: dict[str, Path] = {}
        for repo in self.repos:
            if not repo.is_dir():
                raise ServeError(f"{repo} is not a directory; write a repository with `prune-export deploy BUILD --repo DIR`")
            found = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
            if not found:
                raise ServeError(f"{repo} holds no model (no */config.pbtxt); write one with `prune-export deploy`")
            for name in found:
                if name in models:
                    raise ServeError(f"model {name} is in both {models[name]} and {repo}; deploy one of them with another --name")
                models[name] = repo
        if not _gpus_present():
            gpu = [m for m, repo in models.items() if "KIND_GPU" in (repo / m / "config.pbtxt").read_text()]
            if gpu:
                raise ServeError(
                    f"{', '.join(gpu)} ask for KIND_GPU instances and this machine has no GPU; deploy again with "
                    "--device cpu to serve locally"
                )
        return sorted(models)

    def _backend_dir(self) -> Path:
        backends = Path(tempfile.mkdtemp(prefix="prune-export-triton-backends-"))
        python = backends / "python"
        shutil.copytree(self.env.pytriton / "backends" / "python", python)
        shutil.copy2(self.env.stub(), python / "triton_python_backend_stub")
        (backends / "onnxruntime").mkdir()
        shutil.copyfile(MODELS_DIR / "onnxruntime_backend.py", backends / "onnxruntime" / "model.py")
        return backends

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.env.tritonserver), *[f"--model-repository={repo}" for repo in self.repos],
            "--backend-directory", str(backends),
            "--http-address", "127.0.0.1", "--http-port", str(self.ports["http"]),
            "--grpc-address", "127.0.0.1", "--grpc-port", str(self.ports["grpc"]),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(self.ports["metrics"]),
            "--allow-metrics", "true", "--log-verbose", "0", "--exit-timeout-secs", "5",
        ]  # fmt: skip

    def start(self) -> LocalTritonServer:
        self.env.ensure()
        self._backends = self._backend_dir()
        environ = dict(os.environ)
        # The stub takes its Python from the first python3 on PATH; numpy<2 lives in the server environment.
        environ["PATH"] = f"{self.env.path / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
        # The stub embeds libpython3.X: it must be this interpreter's (a system libpython of another patch
        # release lacks symbols that this Python's extension modules need), so its LIBDIR comes first.
        libpython = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
        environ["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libpython, str(self.env.libs), environ.get("LD_LIBRARY_PATH")) if p
        )
        environ.pop("PYTHONPATH", None)
        for port_name, port in self.ports.items():
            if _port_in_use(port):
                raise ServeError(f"port {port} (--{port_name}-port) is in use on 127.0.0.1; pass another")
        out = self.log_file if self.log_file is not None else None
        self.process = subprocess.Popen(self.command(self._backends), env=environ, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        preexec_fn=_die_with_parent)  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until the server says every model is ready; one line naming the failure if it stops first."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.cleanup()
                raise ServeError(
                    f"tritonserver exited with code {code} before it was ready (a model failed to load: its "
                    "error is in the server log above)"
                )
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise ServeError(f"tritonserver was not ready after {timeout:.0f} s; see its log")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server and wait for it (SIGKILL after ``timeout``); its exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
        self.cleanup()
        return code

    def cleanup(self) -> None:
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None

    def __enter__(self) -> LocalTritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...): a server's model processes, for tests and the
    soak script that look for what is left behind or measure their memory."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False

"""A client of a deployed model (``prune-export ask``): image + question to a Triton server, answer back.

:class:`TritonAsker` talks HTTP or gRPC through ``tritonclient``. It finds the model to call (the one whose
inputs are ``image`` and ``question``) when none is named, and reads from the model's configuration whether
it is decoupled (``deploy --stream`` or ``--max-batch`` > 1): a decoupled model is called over a gRPC stream and its text pieces
are handed to ``on_text`` as they arrive. Every failure (server unreachable, model missing, a request the
model refuses) becomes one :class:`~prune_core.errors.ServeError` line with the server's own message.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from prune_core.errors import ServeError

Protocol = Literal["http", "grpc"]


@dataclass
class AskResult:
    answer: str
    latency_ms: float  # request sent -> last byte of the answer received
    model: str
    protocol: str
    url: str
    new_tokens: int | None = None
    ttft_ms: float | None = None  # streaming only: request sent -> first text piece
    pieces: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("pieces")
        return out


def parse_url(url: str, protocol: Protocol | None) -> tuple[str, Protocol]:
    """``host:port`` and the protocol from ``http://host:port``, ``grpc://host:port`` or ``host:port``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    scheme = scheme.lower()
    if scheme and scheme not in ("http", "grpc"):
        raise ServeError(f"URL {url!r}: use http://HOST:PORT or grpc://HOST:PORT (https is not supported here)")
    if scheme and protocol and scheme != protocol:
        raise ServeError(f"URL {url!r} says {scheme} but --protocol is {protocol}; use one of them")
    address = rest.split("/", 1)[0]
    if ":" not in address:
        raise ServeError(f"URL {url!r} has no port: pass HOST:PORT (Triton serves HTTP on 8000, gRPC on 8001)")
    return address, (protocol or scheme or "http")  # type: ignore[return-value]


class TritonAsker:
    """Questions to one model of one Triton server (see the module docstring)."""

    def __init__(self, url: str, *, protocol: Protocol | None = None, model: str | None = None, timeout: float = 600.0) -> None:
        self.address, self.protocol = parse_url(url, protocol)
        self.url = f"{self.protocol}://{self.address}"
        self.timeout = timeout
        self._client = self._connect()
        self.model = model or self._find_model()
        config = self._config(self.model)
        names = {t["name"] for t in config.get("input", [])}
        if not {"image", "question"} <= names:
            raise ServeError(f"model {self.model} at {self.url} takes {sorted(names)}, not image and question; "
                             "name the model `prune-export deploy` wrote (--name)")  # fmt: skip
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))

    # -- connection ------------------------------------------------------------------------------------
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _connect(self) -> Any:
        module = self._module()
        try:
            client = module.InferenceServerClient(self.address, network_timeout=self.timeout) if self.protocol == "http" \
                else module.InferenceServerClient(self.address)  # fmt: skip
            live = client.is_server_live()
        except Exception as exc:  # connection refused, DNS, protocol mismatch: all mean "not reachable here"
            raise ServeError(f"cannot reach a Triton server at {self.url} ({_message(exc)}); start one with "
                             "`prune-export serve REPO` or check the address and --protocol") from None  # fmt: skip
        if not live:
            raise ServeError(f"the Triton server at {self.url} is not live")
        return client

    def _config(self, model: str) -> dict[str, Any]:
        try:
            if self.protocol == "grpc":
                return self._client.get_model_config(model, as_json=True)["config"]
            return self._client.get_model_config(model)
        except Exception as exc:
            raise ServeError(f"model {model} is not served at {self.url} ({_message(exc)})") from None

    def _find_model(self) -> str:
        index = self._client.get_model_repository_index(as_json=True) if self.protocol == "grpc" \
            else self._client.get_model_repository_index()  # fmt: skip
        entries = index.get("models", []) if isinstance(index, dict) else index
        ready = [e["name"] for e in entries if e.get("state") == "READY"]
        callable_models = []
        for name in ready:
            names = {t["name"] for t in self._config(name).get("input", [])}
            if {"image", "question"} <= names:
                callable_models.append(name)
        if len(callable_models) != 1:
            found = ", ".join(callable_models) or "none"
            raise ServeError(f"{self.url} serves {len(callable_models)} models that take image and question ({found}); "
                             "name one with --model")  # fmt: skip
        return callable_models[0]

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass

    def __enter__(self) -> TritonAsker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------------------
    def _inputs(self, image: bytes, question: str, max_new_tokens: int | None, ignore_eos: bool) -> list[Any]:
        module = self._module()
        tensors: list[tuple[str, np.ndarray, str]] = [
            ("image", np.array([image], dtype=np.object_), "BYTES"),
            ("question", np.array([question.encode("utf-8")], dtype=np.object_), "BYTES"),
        ]
        if max_new_tokens is not None:
            tensors.append(("max_new_tokens", np.array([max_new_tokens], dtype=np.int32), "INT32"))
        if ignore_eos:
            tensors.append(("ignore_eos", np.array([True]), "BOOL"))
        inputs = []
        for name, value, dtype in tensors:
            tensor = module.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return inputs

    def ask(
        self,
        image: bytes,
        question: str,
        *,
        max_new_tokens: int | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> AskResult:
        """The model's answer; with a decoupled model, ``on_text`` receives each text piece as it comes."""
        inputs = self._inputs(image, question, max_new_tokens, ignore_eos)
        if self.decoupled:
            if self.protocol != "grpc":
                raise ServeError(f"model {self.model} is decoupled (deployed with --stream or --max-batch > 1): ask it with "
                                 "--protocol grpc (the gRPC port, 8001 by default)")  # fmt: skip
            return self._ask_stream(inputs, on_text)
        started = time.perf_counter()
        try:
            result = self._client.infer(self.model, inputs)
        except Exception as exc:
            raise ServeError(f"{self.url} refused the request: {_message(exc)}") from None
        latency = (time.perf_counter() - started) * 1e3
        answer = result.as_numpy("answer").reshape(-1)[0].decode("utf-8")
        new_tokens = int(result.as_numpy("new_tokens").reshape(-1)[0])
        if on_text is not None:
            on_text(answer)
        return AskResult(answer, latency, self.model, self.protocol, self.url, new_tokens, pieces=[answer])

    def _ask_stream(self, inputs: list[Any], on_text: Callable[[str], None] | None) -> AskResult:
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = self._client
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        pieces: list[str] = []
        new_tokens = None
        ttft = None
        started = time.perf_counter()
        try:
            client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServeError(f"{self.url}: no response from {self.model} in {self.timeout:.0f} s") from None
                if error is not None:
                    raise ServeError(f"{self.url} refused the request: {_message(error)}")
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if result.as_numpy("answer") is not None:
                    piece = result.as_numpy("answer").reshape(-1)[0].decode("utf-8")
                    new_tokens = int(result.as_numpy("new_tokens").reshape(-1)[0])
                    if ttft is None:
                        ttft = (time.perf_counter() - started) * 1e3
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
                if final is not None and final.bool_param:
                    break
        finally:
            client.stop_stream()
        latency = (time.perf_counter() - started) * 1e3
        return AskResult("".join(pieces), latency, self.model, self.protocol, self.url, new_tokens or 0, ttft, pieces)


def _message(exc: BaseException) -> str:
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return " ".join(str(message).split()) or type(exc).__name__

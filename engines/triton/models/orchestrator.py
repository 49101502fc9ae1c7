"""The Triton model a client calls: image + question in, the greedy answer out (Python backend, BLS).

``prune-export deploy`` copies this file to ``REPO/NAME/1/model.py`` with, beside it:

- ``generation.json``: the names of the graph models (``NAME_vision``, ``NAME_embed``, ``NAME_prefill`` or
  ``NAME_prefill_head``/``NAME_prefill_tail``, ``NAME_decode``), the dtypes of their inputs, the model's
  layer count, visual tokens, image token and EOS ids, the answer-length bound and default, and for a split
  AutoPrune prefill the schedule table the host looks the per-layer counts up in;
- ``processor/``: the build's tokenizer and image processor (loaded with transformers' ``AutoProcessor``);
- ``prune_export_prompt.py``: prune-export's prompt and detokenisation rules, so a served answer is the
  answer ``prune-export run`` gives; for an any-resolution (LLaVA-NeXT) build also ``prune_export_anyres.py``,
  the tiling rules that pack the vision model's per-tile outputs into the image's visual tokens (the image's
  own count: the base image, the unpadded tile grid and a newline token per grid row).

One request is: preprocess (chat template, image -> pixels) -> ``vision`` -> ``embed`` -> prefill (single,
or head -> schedule row -> tail) -> greedy ``decode`` steps, each step sending every layer's cache (its own
length per layer: pruned layers hold fewer tokens) and receiving it back one token longer, until an EOS
token or ``max_new_tokens``. A decoupled deployment (``deploy --stream``) sends the answer's text pieces as
they come and then a final empty response.

Inputs: ``image`` (TYPE_STRING [1]: encoded image bytes), ``question`` (TYPE_STRING [1]), optional
``max_new_tokens`` (TYPE_INT32 [1]) and ``ignore_eos`` (TYPE_BOOL [1]: generate exactly ``max_new_tokens``,
for benchmarks). Outputs: ``answer`` (TYPE_STRING [1]) and ``new_tokens`` (TYPE_INT32 [1]). A bad request
(bytes that are not an image, an image larger than the deployment's pixel limit, a question that is empty or
not UTF-8, ``max_new_tokens`` out of range, a prompt the graphs cannot take) gets an INVALID_ARG (HTTP 400)
response that says what was wrong, before any graph runs; the model stays loaded.
"""

from __future__ import annotations

import io
import json
import math
import sys
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

KV_KINDS = ("key", "value", "position")
#: How long unloading waits for the requests in flight to finish (generation.json ``drain_seconds``).
DRAIN_SECONDS = 20.0
#: The schedule table's rounding slack (prune_core.autoprune.INDEX_SLACK), written into generation.json.
DEFAULT_INDEX_SLACK = 1e-9


class RequestError(Exception):
    """What was wrong with one request; becomes that request's error response (INVALID_ARG)."""


class GraphModelError(Exception):
    """A graph model failed a BLS request; the request gets an INTERNAL error naming it."""


def schedule_index(complexity: float, schedule: dict) -> int:
    """Row of the schedule table for a prompt whose layer-1 complexity is ``complexity``.

    ``k = max(k0 - gamma * I1, 0)``, clamped to ``[0, k0]``, nearest grid point (halves up), as the build's
    runtime does it; ``tests/engines/test_triton_orchestrator.py`` holds it to ``ScheduleTable.index``.
    """
    if math.isnan(complexity):
        raise GraphModelError("the prefill head returned a NaN complexity")
    k0, step = float(schedule["k0"]), float(schedule["k_step"])
    k = min(max(k0 - float(schedule["gamma"]) * float(complexity), 0.0), k0)
    slack = float(schedule.get("index_slack", DEFAULT_INDEX_SLACK))
    return min(math.floor(k / step + 0.5 + slack), len(schedule["keep"]) - 1)


def _text(request, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold one element, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="strict")
    return str(value)


def decode_session(path: Path, use_gpu: bool):
    """An ONNX Runtime session of the build's decode graph, for decode steps inside this model
    (``generation.json`` ``decode_in: orchestrator``): the batch's caches then stay in this process, where a
    BLS request to the decode model would copy every layer's cache to it and back at every step."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.config = json.loads(args["model_config"])
        self.name = self.config["name"]
        here = Path(args["model_repository"]) / args["model_version"]
        self.spec = json.loads((here / "generation.json").read_text())
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        sys.path.insert(0, str(here))
        import prune_export_prompt

        self.rules = prune_export_prompt
        from transformers import AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.processor = AutoProcessor.from_pretrained(str(here / self.spec["processor"]), local_files_only=True)
        self.models = self.spec["models"]
        self.dtypes = {name: np.dtype(d) for name, d in self.spec["input_dtypes"].items()}
        self.layers = int(self.spec["num_layers"])
        self.eos = {int(i) for i in self.spec["eos_token_ids"]}
        self.kv_inputs = [f"past.{layer}.{kind}" for layer in range(self.layers) for kind in KV_KINDS]
        self.kv_outputs = [f"present.{layer}.{kind}" for layer in range(self.layers) for kind in KV_KINDS]
        self.stream = bool(self.spec.get("stream", self.decoupled))
        self.scheduler = None
        self.finished: dict = {}  # finish reason -> requests, logged whenever the batch falls idle and at unload
        if self.decoupled:  # one background loop decodes every request in flight together
            import prune_export_batching

            self.batching = prune_export_batching
            engine = self
            if self.spec.get("decode_in") == "orchestrator":  # the caches stay in this process
                decode_file = Path(args["model_repository"]).parent / self.models["decode"] / "1" / "model.onnx"
                session = decode_session(decode_file, self.spec.get("device") == "gpu")
                engine = prune_export_batching.OrtDecodeEngine(session, self.layers)
            self.scheduler = prune_export_batching.Scheduler(
                engine, self.layers, max_batch=int(self.spec.get("max_batch", 1)),
                kv_budget_bytes=self.spec.get("kv_budget_bytes"))  # fmt: skip
            self.loop = threading.Thread(target=self._serve, name=f"{self.name}-batching", daemon=True)
            self.loop.start()
        self.anyres = None
        tiling = self.spec.get("any_resolution")
        if tiling is not None:  # LLaVA-NeXT: the image's tiles are packed here, as the build's runtime packs them
            import prune_export_anyres

            self.anyres = prune_export_anyres
            self.tiling = prune_export_anyres.Tiling(int(tiling["image_size"]), int(tiling["patch_size"]),
                                                     tuple((int(h), int(w)) for h, w in tiling["image_grid_pinpoints"]))  # fmt: skip

    # -- one BLS call ----------------------------------------------------------------------------------
    def _infer(self, model: str, feeds: dict, outputs: list) -> dict:
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()],
            requested_output_names=outputs,
        )
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            if "not healthy" in message:  # its backend process died; Triton does not restart it
                message += " (its process died; restart the server to serve this model again)"
            raise GraphModelError(f"{model}: {message}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    # -- request -> prompt -----------------------------------------------------------------------------
    def _parse(self, request) -> tuple:
        image_tensor = pb_utils.get_input_tensor_by_name(request, "image")
        if image_tensor is None:
            raise RequestError("input 'image' is missing: send the encoded image file (PNG, JPEG, ...) as bytes")
        raw = image_tensor.as_numpy().reshape(-1)
        if raw.size != 1:
            raise RequestError(f"image must hold one element (one encoded image file), got {raw.size}")
        data = raw[0] if isinstance(raw[0], bytes) else bytes(raw[0])
        max_pixels = int(self.spec.get("max_image_pixels", self.rules.MAX_IMAGE_PIXELS))
        try:
            image = self.rules.decode_image(io.BytesIO(data), max_pixels)
        except self.rules.PromptError as exc:
            raise RequestError(f"image ({len(data)} bytes): {exc}") from None
        try:
            question = _text(request, "question")
        except UnicodeDecodeError as exc:
            raise RequestError(f"question is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position "
                               f"{exc.start}); send it in UTF-8") from None  # fmt: skip
        if question is None:
            raise RequestError("input 'question' is missing")
        try:
            self.rules.check_question(question)
        except self.rules.PromptError as exc:
            raise RequestError(str(exc)) from None
        bound = int(self.spec["max_new_tokens"])
        new_tokens = int(self.spec["default_new_tokens"])
        tensor = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
        if tensor is not None:
            values = tensor.as_numpy().reshape(-1)
            if values.size != 1:
                raise RequestError(f"max_new_tokens must hold one element, got {values.size}")
            new_tokens = int(values[0])
            if not 1 <= new_tokens <= bound:
                raise RequestError(f"max_new_tokens must be between 1 and {bound} (this deployment's bound), got {new_tokens}")
        ignore = pb_utils.get_input_tensor_by_name(request, "ignore_eos")
        ignore_eos = bool(ignore.as_numpy().reshape(-1)[0]) if ignore is not None else False
        return image, question, new_tokens, ignore_eos

    def _prompt(self, image, question: str) -> tuple:
        """The request's prompt (chat template, pixels, the image span), checked before any graph runs."""
        processor = self.processor
        try:
            inputs = processor(images=image, text=self.rules.prompt_text(processor, question), return_tensors="np")
        except Exception as exc:
            raise RequestError(f"the image processor rejected the input ({type(exc).__name__}: {exc})") from None
        ids = np.asarray(inputs["input_ids"][0], dtype=np.int64)
        pixels, visual, index = np.asarray(inputs["pixel_values"]), int(self.spec["visual_tokens"]), None
        try:  # the runtime's checks, before any graph runs
            if self.anyres is not None:  # this image's own tiles and visual tokens
                height, width = (int(v) for v in np.asarray(inputs["image_sizes"]).reshape(-1)[:2])
                index = self.tiling.pack_index(height, width)
                visual = len(index)
                pixels = pixels[0][: self.tiling.tiles_for(height, width)]
                self.rules.check_autoprune_image(width, height, visual, self.spec.get("autoprune_n0"))
            start, end = self.rules.image_span(ids, int(self.spec["image_token_id"]), visual,
                                               int(self.spec.get("max_sys_tokens", len(ids))),
                                               int(self.spec.get("max_text_tokens", len(ids))))  # fmt: skip
        except self.rules.PromptError as exc:
            raise RequestError(str(exc)) from None
        return ids, pixels, index, start, end

    def _feeds(self, prompt: tuple) -> dict:
        """The prefill's inputs: ``vision`` (tiles packed for any-resolution builds) and ``embed``."""
        ids, pixels, index, start, end = prompt
        m = self.models
        names = ["image_features", "cls_attention"] + (["image_newline"] if index is not None else [])
        vision = self._infer(m["vision"], {"pixel_values": pixels.astype(self.dtypes["pixel_values"])}, names)
        if index is not None:
            vision["image_features"], vision["cls_attention"] = self.anyres.pack(
                index, vision["image_features"], vision["cls_attention"], vision["image_newline"])  # fmt: skip
        embeds = self._infer(m["embed"], {"input_ids": ids[None]}, ["inputs_embeds"])["inputs_embeds"]
        feeds = {"sys_embeds": embeds[:, :start], "image_embeds": vision["image_features"],
                 "text_embeds": embeds[:, end:], "cls_attention": vision["cls_attention"]}  # fmt: skip
        return {k: v.astype(self.dtypes[k], copy=False) for k, v in feeds.items()}

    def _prefill_feeds(self, image, question: str) -> dict:
        return self._feeds(self._prompt(image, question))

    def _prefill(self, feeds: dict) -> tuple:
        m = self.models
        if "prefill" in m:
            out = self._infer(m["prefill"], feeds, ["logits", *self.kv_outputs])
            return out["logits"], out
        head_outputs = self.spec["head_outputs"]
        head = self._infer(m["prefill_head"], feeds, head_outputs)
        schedule = self.spec["schedule"]
        row = schedule_index(float(np.asarray(head["autoprune.complexity"]).reshape(-1)[0]), schedule)
        tail_feeds = {name: value for name, value in head.items() if name.startswith("tail.")}
        tail_feeds["keep_counts"] = np.asarray(schedule["keep"][row], dtype=np.int64)
        tail_feeds["merged_counts"] = np.asarray(schedule["merged"][row], dtype=np.int64)
        out = {name: value for name, value in head.items() if name.startswith("present.")}
        out.update(self._infer(m["prefill_tail"], tail_feeds, self.spec["tail_outputs"]))
        missing = [name for name in ["logits", *self.kv_outputs] if name not in out]
        if missing:
            raise GraphModelError(f"the split prefill did not return {missing[:3]}; redeploy the build")
        return out["logits"], out

    def _tokens(self, image, question: str, max_new_tokens: int, ignore_eos: bool):
        """Greedy token ids (EOS not yielded), as the build's runtime generates them."""
        logits, out = self._prefill(self._prefill_feeds(image, question))
        logits = logits[0]
        cache = {f"past.{name[len('present.'):]}": out[name] for name in self.kv_outputs}
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            if token in self.eos and not ignore_eos:
                return
            yield token
            if step + 1 == max_new_tokens:
                return
            result = self._infer(self.models["decode"], {"input_ids": np.array([[token]], dtype=np.int64), **cache},
                                 ["logits", *self.kv_outputs])  # fmt: skip
            logits = result["logits"][0]
            cache = {f"past.{name[len('present.'):]}": result[name] for name in self.kv_outputs}

    # -- responses -------------------------------------------------------------------------------------
    @staticmethod
    def _response(text: str, new_tokens: int):
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("answer", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("new_tokens", np.array([new_tokens], dtype=np.int32)),
        ])  # fmt: skip

    @staticmethod
    def _error(message: str, bad_request: bool = True):
        """An error response: INVALID_ARG (HTTP 400) for a bad request, INTERNAL (500) for a failure here."""
        code = getattr(pb_utils.TritonError, "INVALID_ARG" if bad_request else "INTERNAL", None)
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        return pb_utils.InferenceResponse(error=error)

    def _answer(self, request):
        image, question, max_new_tokens, ignore_eos = self._parse(request)
        pieces = self.rules.TextPieces(self.processor.tokenizer)
        for token in self._tokens(image, question, max_new_tokens, ignore_eos):
            pieces.add(token)
        return self._response(pieces.text(), len(pieces.ids))

    # -- the batching scheduler's engine (decoupled deployments) -----------------------------------------
    def decode(self, input_ids, cache: list) -> tuple:
        """One decode step of the batch through the decode model (``prune_export_batching.DecodeEngine``)."""
        feeds = {"input_ids": input_ids, **dict(zip(self.kv_inputs, cache, strict=True))}
        result = self._infer(self.models["decode"], feeds, ["logits", *self.kv_outputs])
        return result["logits"], [result[name] for name in self.kv_outputs]

    @staticmethod
    def to_numpy(value):
        return value

    def _prefilled(self, prompt: tuple):
        logits, out = self._prefill(self._feeds(prompt))
        return self.batching.Prefilled(np.asarray(logits[0], dtype=np.float32), [out[name] for name in self.kv_outputs])

    def _serve(self) -> None:
        """The background loop: admit, step, retire, until the model is unloaded. A failure outside any one
        request (a bug) ends the requests in flight with its reason, and the loop goes on."""
        while True:
            try:
                self.scheduler.serve(on_idle=self._log_account)
                return
            except Exception as exc:
                pb_utils.Logger.log_error(f"{self.name}: batching loop: {type(exc).__name__}: {exc}")
                self.scheduler.fail_all(GraphModelError(f"internal error {type(exc).__name__}: {exc}"))

    def _send(self, sender, response=None, final: bool = False) -> None:
        """Send, never raising: a client that went away must not stop the loop (its request is cancelled)."""
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)
        except Exception as exc:
            pb_utils.Logger.log_warn(f"{self.name}: could not send a response ({type(exc).__name__}: {exc})")

    def _failure(self, exc: BaseException):
        if isinstance(exc, (RequestError, self.batching.BatchingError)):
            return self._error(f"{self.name}: {exc}")
        if isinstance(exc, GraphModelError):
            return self._error(f"{self.name}: {exc}", False)
        return self._error(f"{self.name}: internal error {type(exc).__name__}: {exc}", False)

    def _submit(self, request) -> None:
        """Parse and check ``request``, then hand it to the scheduler; its responses go out from the loop."""
        sender = request.get_response_sender()
        try:
            image, question, max_new_tokens, ignore_eos = self._parse(request)
            prompt = self._prompt(image, question)
        except RequestError as exc:
            self._send(sender, self._error(f"{self.name}: {exc}"), final=True)
            return
        except Exception as exc:
            self._send(sender, self._error(f"{self.name}: internal error {type(exc).__name__}: {exc}", False), final=True)
            return
        pieces = self.rules.TextPieces(self.processor.tokenizer)
        stream = self.stream

        def on_token(job, token: int) -> None:
            piece = pieces.add(token)
            if stream and piece:
                self._send(sender, self._response(piece, len(pieces.ids)))

        def on_finish(job, error) -> None:
            self.finished[job.finish_reason] = self.finished.get(job.finish_reason, 0) + 1
            if error is not None:
                self._send(sender, self._failure(error), final=True)
            elif job.finish_reason == "cancelled":
                self._send(sender, final=True)
            elif stream:
                rest = pieces.finish()
                if rest:
                    self._send(sender, self._response(rest, len(pieces.ids)))
                self._send(sender, final=True)
            else:
                self._send(sender, self._response(pieces.text(), len(pieces.ids)), final=True)

        cancelled = getattr(request, "is_cancelled", None) or getattr(sender, "is_cancelled", None)
        job = self.batching.Request(lambda: self._prefilled(prompt), max_new_tokens, frozenset(self.eos), ignore_eos,
                                    on_token=on_token, on_finish=on_finish, is_cancelled=cancelled)  # fmt: skip
        try:
            self.scheduler.submit(job)
        except self.batching.BatchingError as exc:
            self._send(sender, self._error(f"{self.name}: {exc}", False), final=True)

    def execute(self, requests: list):
        if self.scheduler is not None:
            for request in requests:
                self._submit(request)
            return None
        responses = []
        for request in requests:
            try:
                responses.append(self._answer(request))
            except RequestError as exc:
                responses.append(self._error(f"{self.name}: {exc}"))
            except GraphModelError as exc:
                responses.append(self._error(f"{self.name}: {exc}", False))
            except Exception as exc:
                responses.append(self._error(f"{self.name}: internal error {type(exc).__name__}: {exc}", False))
        return responses

    def finalize(self) -> None:
        """Unloading (SIGTERM, a repository change): the requests in flight finish first, for at most
        ``drain_seconds``; whatever is left then gets an error that says the server is shutting down."""
        if self.scheduler is None:
            return
        self.scheduler.stop(drain_s=float(self.spec.get("drain_seconds", DRAIN_SECONDS)))
        self.loop.join()
        self.scheduler.fail_all(GraphModelError("the server is shutting down; send the request again when it is back"))
        self._log_account()

    def _log_account(self) -> None:
        """The model's account so far, in the server log whenever its last request in flight has finished."""
        sizes = self.scheduler.batch_sizes
        done = self.finished
        pb_utils.Logger.log_info(
            f"{self.name}: {sum(done.values())} requests ({', '.join(f'{k} {v}' for k, v in sorted(done.items()))}); "
            f"{len(sizes)} decode steps, mean batch {np.mean(sizes) if sizes else 0:.2f}, largest {max(sizes, default=0)}")

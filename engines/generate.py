"""Answers from a build directory: image + question in, greedy answer out, on ONNX Runtime.

:class:`GenerationRunner` owns the sessions of one build (``vision``, ``embed``, the prefill: single or
split, and ``decode``) and the tokenizer/image processor the build carries in ``processor/``, so a build
directory answers questions without the model folder it was made from. One answer is:

1. the prompt: the chat template of the copied processor (the rule the graphs were checked with), the
   image expanded to its visual tokens, pixels preprocessed;
2. ``vision`` (features, [CLS] attention) and ``embed`` (token embeddings of the text around the image);
3. the (pruned) prefill: logits of the last prompt token and each layer's KV cache, each layer with its
   own length and positions;
4. greedy decode steps through ``decode`` until an EOS token or ``max_new_tokens``; decode steps are never
   pruned, every layer's cache grows by one token per step.

**Where the KV caches live.** After the prefill, every layer's key/value/position tensors become ONNX
Runtime values (``OrtValue``) once, and each decode step binds the previous step's output values as its
inputs through IO binding: the caches stay in ONNX Runtime's memory (the GPU's, under the CUDA provider)
and never pass through numpy again; only the token id goes in and the logits row comes out. The step
appends to each cache with a ``Concat`` inside the graph (a copy of that layer's cache per step, as
HuggingFace's dynamic cache does with ``torch.cat``). The alternative, per-layer buffers preallocated to
the prefill length + ``max_new_tokens`` and written in place, needs ONNX Runtime's contrib
``GroupQueryAttention`` operator with shared past/present buffers: a Microsoft-domain operator with its own
rotary and position conventions that TensorRT does not parse, while the decode graph here is standard ONNX
that every runtime of a build (ONNX Runtime, TensorRT, Triton) runs as it is. At LLaVA sizes the copy is
small next to the step's weight reads (one 700-token layer cache of a 7B model is 2.9 MB in fp16, its
weights 400 MB).

Lifecycle as every runner (:class:`engines.runner.Runner`): ``activate()`` (or a ``with`` block, or first
use) creates the sessions, ``deactivate()`` drops them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.batching import OrtDecodeEngine, Prefilled, Request, Scheduler
from engines.prefill import BuildRunner, PrefillRunner
from engines.runner import Runner
from prune_core import defaults
from prune_core.anyres import pack
from prune_core.errors import BuildError, PruneExportError
from prune_core.manifest import check_batch_size, check_new_tokens
from prune_core.prompt import (
    PromptError,
    TextPieces,
    check_autoprune_image,
    check_question,
    image_span,
    prompt_text,
)

KV_KINDS = ("key", "value", "position")


class GenerationError(PruneExportError):
    """Bad input to a generation (empty question, max_new_tokens < 1, an image the processor rejects)."""


def pack_tiles(spec: Any, vision: dict[str, np.ndarray], image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """An any-resolution vision graph's per-tile outputs packed into one image's visual tokens, as the model
    packs them (:func:`prune_core.anyres.pack` by :meth:`~prune_core.spec.ModelSpec.pack_index`):
    ``image_features [1, V, d]`` with ``image_newline`` after every grid row, and ``cls_attention [1, V]``
    (0 for the newline tokens)."""
    features, cls = pack(spec.pack_index(*image_size), vision["image_features"], vision["cls_attention"],
                         vision["image_newline"])  # fmt: skip
    return {"image_features": features, "cls_attention": cls}


@dataclass(frozen=True)
class Prompt:
    """One tokenised prompt with one image, ready for the graphs."""

    input_ids: np.ndarray  # [n] int64, the image span holds the image token id
    image_start: int
    image_end: int  # exclusive
    pixel_values: np.ndarray  # [1, 3, H, W]; any-resolution builds: the tower inputs [tiles, 3, H, W]
    image_size: tuple[int, int] | None = None  # any-resolution builds: the image's (height, width)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class GenerationStats:
    """Timings and sizes of one answer (milliseconds of wall time)."""

    prompt_tokens: int
    new_tokens: int = 0
    ttft_ms: float = 0.0  # prompt in (tokenisation included) -> first token out
    prefill_ms: float = 0.0  # the prefill graph(s) alone
    decode_ms: list[float] = field(default_factory=list)  # one per decode step
    kv_tokens_per_layer: list[int] = field(default_factory=list)  # after the prefill
    provider: str = ""
    queue_ms: float = 0.0  # batched runs: submitted -> admitted (its prefill starts)
    #: AutoPrune builds: what the graph decided for this prompt (``i1``, the schedule row ``keep``/``merged``)
    autoprune: dict[str, Any] | None = None

    @property
    def decode_ms_per_token(self) -> float | None:
        return float(np.mean(self.decode_ms)) if self.decode_ms else None

    def take_request(self, request: Request) -> None:
        """A scheduled request's answer length and timings (its decode steps are the batch's, not timed)."""
        self.new_tokens = len(request.tokens)
        self.ttft_ms = request.ttft_ms or 0.0
        self.queue_ms = request.queue_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ttft_ms": self.ttft_ms,
            "prefill_ms": self.prefill_ms,
            "decode_ms_per_token": self.decode_ms_per_token,
            "decode_steps": len(self.decode_ms),
            "kv_tokens_per_layer": self.kv_tokens_per_layer,
            "provider": self.provider,
            "queue_ms": self.queue_ms,
            **({"autoprune": self.autoprune} if self.autoprune is not None else {}),
        }


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    step_logits: list[np.ndarray] = field(default_factory=list)  # with keep_logits: one row per token


class GenerationRunner(BuildRunner):
    """Greedy generation through one build directory's graphs (see the module docstring)."""

    def _open(self) -> None:
        info = self.manifest.generation
        if info is None or "decode" not in self.manifest.graphs or "embed" not in self.manifest.graphs:
            raise BuildError(
                f"{self.build_dir} was built without the decode and embed graphs (an older prune-export); "
                "rebuild it with `prune-export build` to answer questions with it"
            )
        self.info = info
        self.num_layers = int(self.manifest.model["num_layers"])
        self.spec = self.manifest.model_spec()
        self.eos = frozenset(int(i) for i in info["eos_token_ids"])
        self._sessions: dict[str, Any] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._sessions is not None

    def _activate(self) -> None:
        self._sessions = {
            "vision": self.graph("vision").activate(),
            "embed": self.graph("embed").activate(),
            "decode": self.graph("decode").activate(),
            "prefill": PrefillRunner(self.build_dir, provider=self._provider, threads=self._threads,
                                     manifest=self.manifest).activate(),
            "processor": self._load_processor(),
        }
        self._sessions["decoder"] = OrtDecodeEngine(self._sessions["decode"].session, self.num_layers)

    def _deactivate(self) -> None:
        assert self._sessions is not None
        for part in self._sessions.values():
            if isinstance(part, Runner):
                part.deactivate()
        self._sessions = None

    def check_new_tokens(self, max_new_tokens: int) -> None:
        """One line unless ``max_new_tokens`` is within what the build's decode graph was made for."""
        check_new_tokens(self.manifest, max_new_tokens)

    def _part(self, name: str) -> Any:
        return self.activate()._sessions[name]  # type: ignore[index]

    @property
    def provider(self) -> str:
        return self._part("decode").provider

    @property
    def prefill_runner(self) -> PrefillRunner:
        return self._part("prefill")

    @property
    def tokenizer(self) -> Any:
        return self._part("processor").tokenizer

    def _load_processor(self) -> Any:
        folder = self.build_dir / self.info["processor"]
        from transformers import AutoProcessor
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the torchvision fallback notice of CLIP processors is not actionable
        try:
            return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/... for a damaged folder
            raise BuildError(
                f"cannot load the tokenizer and image processor of {self.build_dir} from {folder} "
                f"({type(exc).__name__}: {exc}); rebuild the directory with `prune-export build`"
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)

    # -- prompt ----------------------------------------------------------------------------------------
    def prompt(self, image: Any, question: str) -> Prompt:
        """Tokenise ``question`` with the build's chat template and preprocess ``image`` (a PIL image)."""
        try:
            check_question(question)
        except PromptError as err:
            raise GenerationError(str(err)) from None
        processor = self._part("processor")
        try:
            inputs = processor(images=image.convert("RGB"), text=prompt_text(processor, question), return_tensors="np")
        except Exception as exc:
            raise GenerationError(f"the image processor rejected the input ({type(exc).__name__}: {exc})") from None
        ids = np.asarray(inputs["input_ids"][0], dtype=np.int64)
        ranges = self.manifest.shape_ranges
        spec = self.spec
        size = None
        pixels = np.asarray(inputs["pixel_values"])
        visual = spec.visual_tokens
        if spec.any_resolution:  # LLaVA-NeXT: this image's own tiles and visual count
            size = (int(inputs["image_sizes"][0][0]), int(inputs["image_sizes"][0][1]))
            visual = spec.visual_tokens_for(*size)
            pixels = pixels[0][: spec.tiles_for(*size)]
            try:
                check_autoprune_image(size[1], size[0], visual, (self.manifest.autoprune or {}).get("n0"))
            except PromptError as err:
                raise GenerationError(f"{self.build_dir}: {err}") from None
        try:
            start, end = image_span(ids, int(self.info["image_token_id"]), visual,
                                    int(ranges["sys_len"][2]), int(ranges["text_len"][2]))  # fmt: skip
        except PromptError as err:
            raise GenerationError(f"{self.build_dir}: {err}") from None
        return Prompt(ids, start, end, pixels, size)

    def prefill_feeds(self, prompt: Prompt) -> dict[str, np.ndarray]:
        """The prefill's inputs: vision features and [CLS] attention, embeddings of the text around them."""
        vision = self._part("vision")
        pixel_dtype = vision.input_metadata()["pixel_values"][0]
        vis = vision.infer({"pixel_values": prompt.pixel_values.astype(pixel_dtype)})
        if prompt.image_size is not None:
            vis = pack_tiles(self.spec, vis, prompt.image_size)
        embeds = self._part("embed").infer({"input_ids": prompt.input_ids[None]})["inputs_embeds"]
        prefill = self._part("prefill")
        meta = prefill.input_metadata()
        feeds = {
            "sys_embeds": embeds[:, : prompt.image_start],
            "image_embeds": vis["image_features"],
            "text_embeds": embeds[:, prompt.image_end :],
            "cls_attention": vis["cls_attention"],
        }
        return {k: np.ascontiguousarray(v.astype(meta[k][0], copy=False)) for k, v in feeds.items()}

    # -- generation ------------------------------------------------------------------------------------
    def prefilled(self, feeds: dict[str, np.ndarray], stats: GenerationStats | None = None) -> Prefilled:
        """The prefill on ``feeds``: the last prompt token's logits and every layer's caches (batch 1)."""
        stats = stats if stats is not None else GenerationStats(prompt_tokens=0)
        t0 = time.perf_counter()
        out = self._part("prefill").infer(feeds)
        stats.prefill_ms = (time.perf_counter() - t0) * 1e3
        stats.kv_tokens_per_layer = [int(out[f"present.{layer}.key"].shape[2]) for layer in range(self.num_layers)]
        stats.provider = self.provider
        if "autoprune.keep" in out:
            stats.autoprune = {"i1": float(np.asarray(out["autoprune.complexity"]).reshape(-1)[0]),
                               "keep": [int(k) for k in out["autoprune.keep"]],
                               "merged": [int(c) for c in out["autoprune.merged"]]}  # fmt: skip
        cache = [out[f"present.{layer}.{kind}"] for layer in range(self.num_layers) for kind in KV_KINDS]
        return Prefilled(np.asarray(out["logits"][0], dtype=np.float32), cache)

    def decode(self, input_ids: np.ndarray, cache: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One decode step of ``input_ids [B, 1]`` over the caches (numpy arrays, or the values the previous
        step returned): ``logits [B, vocab]`` and the caches one token longer, as ONNX Runtime values that
        the next step binds as they are (see the module docstring)."""
        return self._part("decoder").decode(input_ids, cache)

    @staticmethod
    def to_numpy(value: Any) -> np.ndarray:
        """A cache value :meth:`decode` returned, as a numpy array."""
        return OrtDecodeEngine.to_numpy(value)

    def token_ids(
        self,
        feeds: dict[str, np.ndarray],
        max_new_tokens: int,
        stats: GenerationStats | None = None,
        step_logits: list[np.ndarray] | None = None,
        started: float | None = None,
        stop_at_eos: bool = True,
    ) -> Iterator[int]:
        """Greedy token ids after a prefill on ``feeds``, stopping at EOS (not yielded) or ``max_new_tokens``.

        The executor's ``continue_greedy``, step for step. ``stats`` receives the timings; ``started`` is
        when the prompt came in (default: now). ``stop_at_eos=False`` runs all ``max_new_tokens`` steps
        (benchmarks: the same work for every build).
        """
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_new_tokens(self.manifest, max_new_tokens)
        started = time.perf_counter() if started is None else started
        stats = stats if stats is not None else GenerationStats(prompt_tokens=0)
        first = self.prefilled(feeds, stats)
        logits, cache = first.logits, first.cache
        del first
        for step in range(max_new_tokens):
            if step_logits is not None:
                step_logits.append(np.asarray(logits, dtype=np.float32))
            token = int(np.argmax(logits))
            if step == 0:
                stats.ttft_ms = (time.perf_counter() - started) * 1e3
            if token in self.eos and stop_at_eos:
                return
            stats.new_tokens += 1
            yield token
            if step + 1 == max_new_tokens:
                return
            t0 = time.perf_counter()
            rows, cache = self.decode(np.array([[token]], dtype=np.int64), cache)
            logits = rows[0]
            stats.decode_ms.append((time.perf_counter() - t0) * 1e3)

    def scheduler(self, max_batch: int, kv_budget_bytes: int | None = None) -> Scheduler:
        """A continuous-batching :class:`~engines.batching.Scheduler` over this build's decode graph."""
        check_batch_size(self.manifest, max_batch)
        return Scheduler(self.activate(), self.num_layers, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes)

    def request(self, prompt: Prompt, max_new_tokens: int, *, ignore_eos: bool = False,
                on_prefill: Callable[[dict[str, np.ndarray], Prefilled], None] | None = None,
                **callbacks: Any) -> tuple[Request, GenerationStats]:  # fmt: skip
        """A scheduler :class:`~engines.batching.Request` for ``prompt`` whose prefill (vision, embed,
        prefill graphs) runs when the scheduler admits it, and the stats it fills. ``on_prefill(feeds,
        prefilled)`` sees the prefill's inputs and result (``eval`` counts FLOPs and compares first tokens)."""
        check_new_tokens(self.manifest, max_new_tokens)
        stats = GenerationStats(prompt_tokens=prompt.num_tokens)

        def prefill() -> Prefilled:
            feeds = self.prefill_feeds(prompt)
            first = self.prefilled(feeds, stats)
            if on_prefill is not None:
                on_prefill(feeds, first)
            return first

        return Request(prefill, max_new_tokens, self.eos, ignore_eos, **callbacks), stats

    def generate_batch(self, items: list[tuple[Any, str]], max_new_tokens: int = defaults.ANSWER_NEW_TOKENS, *,
                       batch_size: int, kv_budget_bytes: int | None = None) -> list[Answer]:  # fmt: skip
        """Greedy answers to ``(image, question)`` pairs, decoded ``batch_size`` at a time by the
        continuous-batching scheduler; each equals :meth:`generate`'s answer."""
        scheduler = self.scheduler(batch_size, kv_budget_bytes)
        requests = []
        for image, question in items:
            request, stats = self.request(self.prompt(image, question), max_new_tokens)
            requests.append((scheduler.submit(request), stats))
        scheduler.run()
        answers = []
        for request, stats in requests:
            if request.error is not None:
                raise request.error
            stats.take_request(request)
            text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
            answers.append(Answer(text, list(request.tokens), stats))
        return answers

    def stream(self, image: Any, question: str, max_new_tokens: int = defaults.ANSWER_NEW_TOKENS,
               stats: GenerationStats | None = None) -> Iterator[str]:
        """The answer as text pieces, as tokens come; the pieces join to :meth:`generate`'s text."""
        started = time.perf_counter()
        prompt = self.prompt(image, question)
        if stats is not None:
            stats.prompt_tokens = prompt.num_tokens
        pieces = TextPieces(self._part("processor").tokenizer)
        for token in self.token_ids(self.prefill_feeds(prompt), max_new_tokens, stats, started=started):
            piece = pieces.add(token)
            if piece:
                yield piece
        rest = pieces.finish()
        if rest:
            yield rest

    def generate(self, image: Any, question: str, max_new_tokens: int = defaults.ANSWER_NEW_TOKENS,
                 keep_logits: bool = False) -> Answer:
        """The greedy answer to ``question`` about ``image`` (a PIL image), with its timings."""
        started = time.perf_counter()
        prompt = self.prompt(image, question)
        stats = GenerationStats(prompt_tokens=prompt.num_tokens)
        logits: list[np.ndarray] | None = [] if keep_logits else None
        ids = list(self.token_ids(self.prefill_feeds(prompt), max_new_tokens, stats, logits, started))
        text = self._part("processor").tokenizer.decode(ids, skip_special_tokens=True)
        return Answer(text, ids, stats, logits or [])

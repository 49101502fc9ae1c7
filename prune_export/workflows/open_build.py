"""Opening a finished build: its verified runner, its check prompt as prefill feeds, images, and the FLOPs its
prefill graph(s) execute, counted from the graphs.

Shared by the workflows that use a build after it is made (:mod:`.check`, :mod:`.generate`,
:mod:`.measure`, :mod:`.evaluate`). Build files are verified against the manifest's sha256 digests before
any session is made, so a damaged build is named in one line instead of failing inside ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from exporter.baked import BakedPrefill
from graph_passes import census
from prune_core import memory
from prune_core.cost import lm_head_flops
from prune_core.errors import BuildError, DataError
from prune_core.manifest import CHECK_INPUTS, Manifest
from prune_core.prompt import MAX_IMAGE_PIXELS, PromptError, decode_image


def require_file(path: str | Path, what: str = "image") -> Path:
    """``path`` if it is a file, else one line saying whether it is missing or not a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    return path


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """An RGB PIL image from ``path``, read only when its header says it has at most ``max_pixels`` pixels; or
    one line saying why it cannot be read."""
    path = require_file(path)
    try:
        return decode_image(path, max_pixels)
    except PromptError as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def synthetic_image(seed: int) -> Any:
    """The random image of the build check's prompt ``seed`` (and of ``bench --generate``'s default): 120x90
    (wide) for even seeds, 90x150 (tall) for odd ones, so that an any-resolution build is checked on two
    tilings and two visual token counts."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    width, height = (120, 90) if seed % 2 == 0 else (90, 150)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def load_runner(build_dir: str | Path, *, provider: str = "auto", threads: int | None = None,
                manifest: Manifest | None = None) -> Any:  # fmt: skip
    """A verified build's :class:`~engines.generate.GenerationRunner`, not yet active: use it in a ``with``
    block (sessions are made on entry and dropped on exit). ``manifest``: the build's, already loaded with
    ``verify="full"`` by the caller (its files are not hashed again)."""
    from engines.generate import GenerationRunner

    manifest = manifest or Manifest.load(build_dir, verify="full")
    memory.check_fits(f"running {build_dir}", memory.estimate(memory.graphs_bytes(build_dir, list(manifest.graphs))),
                      "run it on a machine with more memory")  # fmt: skip
    return GenerationRunner(build_dir, provider=provider, threads=threads, manifest=manifest)  # type: ignore[arg-type]


def load_check_inputs(build_dir: Path) -> dict[str, np.ndarray]:
    """The build check's first prompt as the build saved it (``check_inputs.npz``: pixels and prefill inputs)."""
    path = Path(build_dir) / CHECK_INPUTS
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except OSError as exc:
        raise BuildError(f"cannot read {path}: {exc}; rebuild the directory with `prune-export build`") from None


def prompt_feeds(build_dir: Path, text_tokens: int | None = None, seed: int = 0,
                 image_size: tuple[int, int] | None = None, *, run: bool = True,
                 manifest: Manifest | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Prefill inputs: the build's check prompt, or with ``text_tokens`` text rows drawn like its embeddings.

    ``image_size`` (height, width), any-resolution builds only: the check prompt with the check image scaled
    to that size, so with that image's visual token count. Its visual rows come from the build's own vision
    graph, packed as the runtime packs them; with ``run=False`` (shape inference, nothing may run) they are
    the check image's rows repeated to that count, which gives the same shapes. ``manifest``: the build's,
    when the caller has it verified already.
    """
    base = load_check_inputs(build_dir)
    feed = {k: base[k] for k in BakedPrefill.PROMPT_INPUTS}
    if image_size is not None:
        manifest = manifest or Manifest.load(build_dir, verify="full" if run else "size")
        feed.update(_image_rows(Path(build_dir), manifest, base, image_size, run))
    if text_tokens is not None:
        if text_tokens < 1:
            raise BuildError(f"--text-tokens must be >= 1, got {text_tokens}")
        rng = np.random.default_rng(seed)
        txt = feed["text_embeds"]
        std = float(txt.std()) or 1.0
        feed["text_embeds"] = (rng.standard_normal((1, text_tokens, txt.shape[2])) * std).astype(txt.dtype)
    return feed


def _image_rows(build_dir: Path, manifest: Manifest, base: Mapping[str, np.ndarray], image_size: tuple[int, int],
                run: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """``image_embeds`` and ``cls_attention`` of an image of ``image_size`` (height, width), from the check
    inputs ``base`` or the build's graphs: see :func:`prompt_feeds`."""
    spec = manifest.model_spec()
    height, width = image_size
    if not spec.any_resolution:
        raise BuildError(
            f"--image-size applies to any-resolution (LLaVA-NeXT) builds; {build_dir} is a {manifest.model['family']} "
            f"build, whose every image gives {spec.visual_tokens} visual tokens: leave --image-size out"
        )
    if height < 1 or width < 1:
        raise BuildError(f"--image-size must be positive, got {width}x{height}")
    if not run:
        visual = spec.visual_tokens_for(height, width)
        rows = base["image_embeds"][0]
        repeat = np.resize(np.arange(rows.shape[0]), visual)
        return {"image_embeds": rows[repeat][None], "cls_attention": base["cls_attention"][0][repeat][None]}
    image = synthetic_image(seed=0).resize((width, height))
    with load_runner(build_dir, provider="cpu", manifest=manifest) as runner:
        feeds = runner.prefill_feeds(runner.prompt(image, "Describe the image."))
    return {"image_embeds": feeds["image_embeds"], "cls_attention": feeds["cls_attention"]}


def cast_feeds(prefill: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds in the dtypes the (possibly fp16/bf16) prefill graph declares."""
    meta = prefill.input_metadata()
    return {k: v.astype(meta[k][0]) if k in meta else v for k, v in feed.items()}


def graph_flops(prefill: Any, feed: Mapping[str, np.ndarray]) -> int:
    """Matmul FLOPs of a build's prefill graph(s) (a :class:`~engines.prefill.PrefillRunner`) for these
    inputs, counted from the graph itself, the LM head's logits row included."""
    feed = cast_feeds(prefill, feed)
    graph = prefill.manifest.graph_path
    if prefill.manifest.prefill_layout == "single":
        return census(graph(prefill.build_dir, "prefill"), input_values=feed).matmul_flops
    _, tail_feeds = prefill.run_head(feed)
    return (census(graph(prefill.build_dir, "prefill_head"), input_values=feed).matmul_flops
            + census(graph(prefill.build_dir, "prefill_tail"), input_values=tail_feeds).matmul_flops)  # fmt: skip


def prefill_graph_flops(runner: Any, feeds: dict[str, np.ndarray]) -> int:
    """Matmul FLOPs a generation runner's prefill graph(s) execute on ``feeds``, counted from the graph,
    without the one logits row of the LM head (the cost model leaves it out, so the two compare)."""
    return graph_flops(runner.prefill_runner, feeds) - lm_head_flops(runner.manifest.model_spec())


def check_same_model(pruned_dir: Path, pruned_m: Manifest, dense_dir: Path, dense_m: Manifest) -> None:
    """Refuse to compare two builds of different models."""
    if pruned_m.model["fingerprint"] != dense_m.model["fingerprint"]:
        raise BuildError(
            f"{pruned_dir} and {dense_dir} were built from different models (fingerprints "
            f"{pruned_m.model['fingerprint']} and {dense_m.model['fingerprint']}); build the baseline from the same model"
        )

"""LLaVA-NeXT (any-resolution) through the adapter and the executor, against HuggingFace's
`LlavaNextForConditionalGeneration` and its processor on the same folder: visual token counts per image size,
the dense prefill's logits of every row and KV caches, greedy answers token for token, at a square, a wide
and a tall image; and the one-line refusals of folders and plans that do not fit."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_clean_error, run
from PIL import Image

from exporter.adapters import load_adapter, load_spec
from exporter.demo import build_demo_model
from exporter.executor import FixedKeepPolicy, PlanExecutor
from exporter.sample import prepare_sample
from prune_core.errors import ModelLoadError
from prune_core.ops import Group, Module, Operation
from prune_core.plan import Plan
from prune_core.spec import GroupSizes

QUESTION = "What color is the circle?"
#: (width, height): a square image, a wide one and a tall one (each tiles at another pinpoint and unpads).
SIZES = [(64, 64), (150, 60), (50, 140)]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def next_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("next") / "next-tiny", "next-tiny", seed=0)


@pytest.fixture(scope="module")
def adapter(next_tiny: Path):
    return load_adapter(next_tiny)


@pytest.fixture(scope="module")
def reference64(next_tiny: Path):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(next_tiny), dtype=torch.float64).eval()


def test_visual_token_counts_are_the_processors(adapter) -> None:
    """The spec counts each image size's tokens from config.json alone; the processor expands <image> into as
    many (an independent count: HuggingFace's tiling and unpadding)."""
    spec = adapter.spec
    assert spec.family == "llava_next" and spec.tile_tokens == 16
    assert spec.visual_tokens == 16 + 8 * 8 + 8  # the largest: a square image at the 112x112 pinpoint
    counts = set()
    for width, height in [(64, 64), (150, 60), (50, 140), (300, 200), (56, 56), (20, 200), (200, 20), (112, 111),
                          (57, 113), (1000, 333), (31, 29), (90, 70)]:  # fmt: skip
        inputs = adapter.processor(images=_image(width, height), text=adapter.prompt_text(QUESTION), return_tensors="pt")
        found = int((inputs["input_ids"][0] == adapter.image_token_id).sum())
        assert spec.visual_tokens_for(height, width) == found, (width, height)
        assert found <= spec.visual_tokens
        counts.add(found)
    assert len(counts) >= 5  # the count really varies with the image


def test_the_7b_spec_reads_2928_visual_tokens_from_the_config(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)  # fmt: skip
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pins).save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert spec.visual_tokens == 576 + 48 * 48 + 48 == 2928  # 672x672: base + 2x2 tiles + one newline per row
    assert spec.visual_tokens_for(672, 672) == 2928
    assert spec.visual_tokens_for(336, 1008) == 576 + 24 * 72 + 24  # a 1:3 image fills the 336x1008 pinpoint
    assert spec.reference_image == (672, 672)
    code, out = run("info", tmp_path, "--json")  # from config.json alone: no weights, no tokenizer
    assert code == 0, out
    info = json.loads(out)
    assert info["image"] == {"height": 672, "width": 672} and info["prompt_visual_tokens"] == 2928
    assert info["groups"] == {"sys": 35, "img_key": 732, "img_rest": 2196, "txt": 100}
    code, out = run("info", tmp_path, "--image-size", "1008x336", "--json")
    assert code == 0 and json.loads(out)["prompt_visual_tokens"] == 576 + 24 * 72 + 24
    assert json.loads(out)["dense_prefill_flops"] < info["dense_prefill_flops"]
    assert_clean_error(*run("info", tmp_path, "--image-size", "672"), "WIDTHxHEIGHT")


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_dense_prefill_matches_hf_forward(adapter, reference64, width: int, height: int) -> None:
    image = _image(width, height)
    tokens = adapter.tokenize(image, QUESTION)
    sample = prepare_sample(adapter, image, QUESTION)
    assert sample.image_end - sample.image_start == adapter.spec.visual_tokens_for(height, width)
    n = sample.num_tokens
    result = PlanExecutor(adapter).prefill(sample, logits_rows=n)
    inputs = {"input_ids": tokens.input_ids[None], "pixel_values": tokens.pixel_values, "image_sizes": tokens.image_sizes}
    with torch.no_grad():
        out = adapter.model(**inputs, use_cache=True)
        out64 = reference64(**{**inputs, "pixel_values": tokens.pixel_values.double()}, use_cache=True)
    bound = max(1e-5, 2 * float((out.logits[0].double() - out64.logits[0]).abs().max()))
    assert bound < 1e-3
    torch.testing.assert_close(result.row_logits, out.logits[0], rtol=0, atol=bound)
    assert out.logits[0].abs().max() > 1e-2
    for layer, cache in enumerate(result.cache or []):
        ref = out.past_key_values.layers[layer]
        torch.testing.assert_close(cache.keys, ref.keys[0], rtol=0, atol=1e-5, msg=f"layer {layer} keys")
        torch.testing.assert_close(cache.values, ref.values[0], rtol=0, atol=1e-5, msg=f"layer {layer} values")
        assert cache.next_position == n


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_greedy_answers_equal_hf_generate(adapter, width: int, height: int) -> None:
    image = _image(width, height, seed=1)
    tokens = adapter.tokenize(image, QUESTION)
    hf = adapter.model.generate(input_ids=tokens.input_ids[None], pixel_values=tokens.pixel_values,
                                image_sizes=tokens.image_sizes, max_new_tokens=8, do_sample=False)[0]  # fmt: skip
    hf_ids = hf[tokens.input_ids.shape[0]:].tolist()
    ours = PlanExecutor(adapter).generate(prepare_sample(adapter, image, QUESTION), max_new_tokens=8).token_ids
    assert ours == hf_ids[: len(ours)] and len(ours) in (len(hf_ids), len(hf_ids) - 1)


def test_key_tokens_are_a_quarter_of_this_images_tokens_from_each_tiles_cls(adapter) -> None:
    """GSOP's img_key: the top quarter of the image's own visual tokens by the [CLS] attention of the tile each
    came from; the newline tokens (one per grid row) are never key tokens."""
    from exporter.sample import GROUP_INDEX

    for width, height in SIZES:
        sample = prepare_sample(adapter, _image(width, height), QUESTION)
        visual = sample.image_end - sample.image_start
        key = int((sample.groups == GROUP_INDEX[Group.IMG_KEY]).sum())
        assert key == round(0.25 * visual)
        tokens = adapter.tokenize(_image(width, height), QUESTION)
        with torch.no_grad():
            tower = adapter.model.model.vision_tower(tokens.pixel_values[0], output_attentions=True)
        # Tile 0 is the base image: its 16 patches are the first 16 visual tokens, in order.
        base_cls = tower.attentions[-2][0, :, 0, 1:].mean(0)
        torch.testing.assert_close(sample.cls_attention[:16], base_cls, rtol=0, atol=1e-6)
        newline = adapter.model.model.image_newline
        embeds = sample.embeds[sample.image_start + 16:sample.image_end]
        is_newline = torch.isclose(embeds, newline[None].to(embeds.dtype), atol=1e-6).all(-1)
        assert int(is_newline.sum()) > 0 and (sample.cls_attention[16:][is_newline] == 0).all()
        assert not (sample.groups[sample.image_start + 16:sample.image_end][is_newline] == GROUP_INDEX[Group.IMG_KEY]).any()


def test_pruning_runs_on_images_of_any_size(adapter) -> None:
    """A fixed schedule keeps its count of this image's tokens (fewer when the image has fewer); keeping all of
    them changes nothing."""
    executor = PlanExecutor(adapter)
    for width, height in SIZES:
        sample = prepare_sample(adapter, _image(width, height), QUESTION)
        visual = sample.image_end - sample.image_start
        dense = executor.prefill(sample)
        same = executor.prefill(sample, policy=FixedKeepPolicy.from_stages([(1, visual)]))
        torch.testing.assert_close(same.logits, dense.logits, rtol=0, atol=1e-5)
        cut = executor.prefill(sample, policy=FixedKeepPolicy.from_stages([(1, 8)]))
        assert cut.visual_tokens_per_layer[2] == 8 and cut.flops < dense.flops


def test_a_processor_without_grid_pinpoints_is_one_line(next_tiny: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A NeXT folder holding LLaVA-1.5's processor (a CLIP image processor, which does not tile) is refused."""
    folder = tmp_path / "clip-processor"
    shutil.copytree(next_tiny, folder)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
        if (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, folder / name)
    with pytest.raises(ModelLoadError, match="has no image_grid_pinpoints"):
        load_adapter(folder)


def test_a_processor_that_tiles_otherwise_is_one_line(next_tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "other-pins"
    shutil.copytree(next_tiny, folder)
    path = next(p for p in (folder / "processor_config.json", folder / "preprocessor_config.json") if p.is_file())
    data = json.loads(path.read_text())
    holder = data.get("image_processor", data)
    holder["image_grid_pinpoints"] = [[56, 56]]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="make the two image_grid_pinpoints lists equal"):
        load_adapter(folder)


def test_image_size_is_refused_for_a_fixed_size_model(tiny_model: Path) -> None:
    assert_clean_error(*run("info", tiny_model, "--image-size", "64x64"), "applies to any-resolution models")


def test_plans_do_not_cross_families(next_tiny: Path, tiny_model: Path, demo_data: Path, tmp_path: Path) -> None:
    for searched_on, used_on in ((tiny_model, next_tiny), (next_tiny, tiny_model)):
        spec = load_spec(searched_on)
        plan = tmp_path / f"{spec.family}.json"
        Plan.new(spec, GroupSizes.default(spec), [[Operation(1, Group.IMG_REST, Module.MLP)]]).save(plan)
        code, out = run("eval", used_on, "--data", demo_data, "--plan", plan, "--budget", "0.99", "--max-new-tokens", 2)
        assert_clean_error(code, out, "search a plan for this model")


def test_eval_and_info_on_next_tiny(next_tiny: Path, demo_data: Path) -> None:
    code, out = run("info", next_tiny, "--json")
    assert code == 0, out
    info = json.loads(out)
    assert info["family"] == "llava_next" and info["visual_tokens"] == 88
    code, out = run("eval", next_tiny, "--data", demo_data, "--keep-schedule", "1:20", "--max-new-tokens", 3, "--json")
    assert code == 0, out
    ev = json.loads(out)
    assert ev["samples"] == 4 and ev["flops_ratio"] < 1.0 and ev["agreement"] is not None


def test_a_tensorrt_autoprune_next_build_answers_as_the_onnxruntime_one(next_tiny: Path, next_builds: dict[str, Path],
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """AutoPrune for TensorRT: the prefill is split into head (layers 0-1 and the complexity) and tail (the
    schedule row's counts as shape tensors). The head takes the image's own visual count; the tail gets the N0
    kept rows and the text positions from the head (text starts after this image's span, which only the head
    knows). It passes the lint and its check, answers a square, a wide and a tall image as the single-graph
    ONNX Runtime build does (itself held to the executor above), and its head engine gets the image-length
    profile."""
    from helpers.fake_tensorrt import fake_tensorrt

    from engines.tensorrt import EnginesFromBuild
    from prune_core.manifest import Manifest

    out = tmp_path / "trt-ap"
    code, text = run("build", next_tiny, "--out", out, "--target", "tensorrt", "--autoprune-tokens", 20)
    assert code == 0 and "prefill split; check passed" in text, text
    answers = set()
    for width, height in SIZES:
        _image(width, height, seed=7).save(tmp_path / "q.png")
        got = [json.loads(run("run", build, "--image", tmp_path / "q.png", "--question", QUESTION, "--max-new-tokens", 6,
                              "--json")[1]) for build in (out, next_builds["autoprune"])]  # fmt: skip
        assert got[0]["answer"] == got[1]["answer"] and got[0]["kv_tokens_per_layer"] == got[1]["kv_tokens_per_layer"]
        answers.add(got[0]["answer"])
    assert len(answers) > 1
    trt, record = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    EnginesFromBuild(out, Manifest.load(out))()
    built = {e["graph"]: e for e in record.engines}
    visual = load_spec(next_tiny).visual_tokens
    assert [d[1] for d in built["prefill_head.onnx"]["shapes"]["image_embeds"]] == [2, visual, visual]
    assert built["prefill_tail.onnx"]["shape_tensors"] == ["keep_counts", "merged_counts"]
    _image(1000, 10).save(tmp_path / "thin.png")  # fewer visual tokens than N0 = 50: refused, as the single graph
    assert_clean_error(*run("run", out, "--image", tmp_path / "thin.png", "--question", QUESTION), "N0 = 50")


def test_a_tensorrt_next_build_profiles_the_images_visual_count(next_tiny: Path, next_builds: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A GSOP plan that splits each image's key and other visual tokens (the hardest graph: a key count computed
    at run time, rows gathered and scattered by index) builds for TensorRT: it passes the TensorRT lint (TopK
    K provably >= 1, ScatterND without reduction) and the parity check; its engines (the strict TensorRT
    stand-in) get a profile over the image's visual count, from 2 to the largest image's, and over the tiles."""
    from helpers.fake_tensorrt import fake_tensorrt

    from engines.tensorrt import EnginesFromBuild
    from prune_core.manifest import Manifest

    out = tmp_path / "trt"
    code, text = run("build", next_tiny, "--out", out, "--target", "tensorrt", "--plan", next_builds["plan"],
                     "--budget", "0.8")  # fmt: skip
    assert code == 0 and "check passed" in text, text
    manifest = Manifest.load(out)
    spec = load_spec(next_tiny)
    trt, record = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    EnginesFromBuild(out, manifest)()
    built = {e["graph"]: e for e in record.engines}
    for name in ("image_embeds", "cls_attention"):
        low, opt, high = built["prefill.onnx"]["shapes"][name]
        assert (low[1], opt[1], high[1]) == (2, spec.visual_tokens, spec.visual_tokens), name
    assert built["vision.onnx"]["shapes"]["pixel_values"][1][0] == spec.max_tiles
    script = (out / "tensorrt_commands.sh").read_text()
    assert f"image_embeds:1x2x{spec.hidden_size}" in script and f"image_embeds:1x{spec.visual_tokens}x" in script


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows whose images have three sizes (three visual token counts), answers made up."""
    folder = tmp_path_factory.mktemp("mixed")
    rows = []
    for i, (width, height) in enumerate(SIZES * 2):
        _image(width, height, seed=10 + i).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": QUESTION if i % 2 else "How many shapes are there?",
                     "answer": "red"})  # fmt: skip
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def next_builds(next_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Builds of every plan kind; each passed its own check (greedy answers through the runtime at a wide and a
    tall check image, logits and caches against the executor)."""
    spec = load_spec(next_tiny)
    plan = tmp_path_factory.mktemp("next-plan") / "plan.json"
    steps = [[Operation(layer, Group.IMG_REST, m) for m in Module] for layer in (1, 2, 3)]
    Plan.new(spec, GroupSizes.default(spec), steps).save(plan)
    kinds = {"dense": [], "gsop": ["--plan", plan, "--budget", "0.8"], "keep": ["--keep-schedule", "1:30"],
             "autoprune": ["--autoprune-tokens", "20"]}  # fmt: skip
    out = {}
    root = tmp_path_factory.mktemp("next-builds")
    for name, options in kinds.items():
        code, text = run("build", next_tiny, "--out", root / name, *options)
        assert code == 0 and "check passed" in text, text
        out[name] = root / name
    out["plan"] = plan
    return out


@pytest.mark.parametrize("kind", ["dense", "gsop", "keep", "autoprune"])
def test_builds_answer_images_of_any_size_as_the_executor(next_builds: dict[str, Path], next_tiny: Path,
                                                          mixed_data: Path, kind: str) -> None:
    """`eval BUILD_DIR` on images of three sizes gives the executor's answers and FLOPs, row by row."""
    code, out = run("eval", next_builds[kind], "--data", mixed_data, "--max-new-tokens", 4, "--json")
    assert code == 0, out
    built = json.loads(out)
    options = {"dense": [], "gsop": ["--plan", next_builds["plan"], "--budget", "0.8"],
               "keep": ["--keep-schedule", "1:30"], "autoprune": ["--autoprune-tokens", "20", "--autoprune-mode", "table"]}
    code, out = run("eval", next_tiny, "--data", mixed_data, "--max-new-tokens", 4, "--json", *options[kind])
    assert code == 0, out
    ref = json.loads(out)
    assert built["agreement"] == ref["agreement"]
    assert built["flops_ratio"] == pytest.approx(ref["flops_ratio"], rel=1e-3)
    assert built["mean_visual_tokens_per_layer"] == pytest.approx(ref["mean_visual_tokens_per_layer"])


@pytest.mark.parametrize("width,height", [(112, 112), (150, 60)])
def test_inspect_counts_an_images_flops_as_info_and_the_cost_model(next_builds: dict[str, Path], next_tiny: Path,
                                                                   width: int, height: int) -> None:
    """`inspect --image-size` counts the FLOPs of that image's prompt from the graphs, by shape inference
    (--no-run, dense) and by running them; they equal `info --image-size` (dense) and the cost model (GSOP) on
    the same prompt, plus the LM head's one logits row the cost model leaves out."""
    from prune_core.cost import lm_head_flops, prefill_flops

    spec = load_spec(next_tiny)
    size = f"{width}x{height}"
    visual = spec.visual_tokens_for(height, width)
    for kind in ("dense", "gsop"):
        counted = []
        for mode in (["--no-run"], []) if kind == "dense" else ([],):
            code, out = run("inspect", next_builds[kind], "--image-size", size, "--text-tokens", 11, "--json", *mode)
            assert code == 0, out
            doc = json.loads(out)
            assert doc["prompt"] == {"sys_tokens": 4, "visual_tokens": visual, "text_tokens": 11}
            counted.append(doc["matmul_flops"])
        assert len(set(counted)) == 1, kind
        if kind == "dense":
            code, out = run("info", next_tiny, "--image-size", size, "--text-tokens", 11, "--json")
            expected = json.loads(out)["dense_prefill_flops"]
        else:
            ops = [Operation.from_str(o) for o in doc["plan"]["ops"]]
            expected = prefill_flops(spec, GroupSizes.for_prompt(spec, 4, 11, visual=visual), ops)
        assert counted[0] == expected + lm_head_flops(spec), kind
    code, out = run("inspect", next_builds["autoprune"], "--image-size", size, "--json")
    assert code == 0 and json.loads(out)["prompt"]["visual_tokens"] == visual
    assert_clean_error(*run("inspect", next_builds["autoprune"], "--image-size", size, "--no-run"), "depends on the prompt")
    # This plan prunes img_rest only, so the graph counts the image's key tokens at run time: --no-run says so.
    assert_clean_error(*run("inspect", next_builds["gsop"], "--image-size", size, "--no-run"),
                       "by a count computed from the image's visual count at run time")


def test_image_size_is_refused_for_a_fixed_size_build(tiny_model: Path, tmp_path: Path) -> None:
    code, out = run("build", tiny_model, "--out", tmp_path / "b", "--skip-check")
    assert code == 0, out
    for command in (["inspect", tmp_path / "b"], ["inspect", tmp_path / "b", "--no-run"],
                    ["bench", tmp_path / "b", "--baseline", tmp_path / "b"]):  # fmt: skip
        assert_clean_error(*run(*command, "--image-size", "64x64"), "applies to any-resolution (LLaVA-NeXT) builds")
    assert_clean_error(*run("inspect", tmp_path / "b", "--image-size", "64x0"), "is not WIDTHxHEIGHT")


def test_run_answers_a_wide_image_as_huggingface(next_builds: dict[str, Path], adapter, tmp_path: Path) -> None:
    image = _image(200, 80, seed=3)
    image.save(tmp_path / "wide.png")
    code, out = run("run", next_builds["dense"], "--image", tmp_path / "wide.png", "--question", QUESTION,
                    "--max-new-tokens", 6, "--json")  # fmt: skip
    assert code == 0, out
    tokens = adapter.tokenize(image, QUESTION)
    hf = adapter.model.generate(input_ids=tokens.input_ids[None], pixel_values=tokens.pixel_values,
                                image_sizes=tokens.image_sizes, max_new_tokens=6, do_sample=False)[0]  # fmt: skip
    assert json.loads(out)["answer"] == adapter.decode(
        [i for i in hf[tokens.input_ids.shape[0]:].tolist() if i not in adapter.eos_token_ids])


def test_pack_index_is_huggingfaces_packing(adapter) -> None:
    """The runtime packs the vision graph's tiles by ModelSpec.pack_index: over a grid of image sizes it puts
    every patch (and newline) where HuggingFace's pack_image_features does."""
    spec, inner = adapter.spec, adapter.model.model
    patches = spec.tile_tokens
    for width in range(20, 400, 47):
        for height in range(20, 400, 53):
            tiles = spec.tiles_for(height, width)
            ids = torch.arange(tiles * patches, dtype=torch.float64).reshape(tiles, patches, 1)
            packed, _ = inner.pack_image_features([ids], torch.tensor([[height, width]]), "default",
                                                  image_newline=torch.tensor([-1.0], dtype=torch.float64))  # fmt: skip
            assert packed[0][:, 0].long().tolist() == spec.pack_index(height, width), (width, height)


@pytest.mark.parametrize("mode", ["exact", "table"])
def test_autoprune_budget_holds_per_image(adapter, mode: str) -> None:
    """AutoPrune on any-resolution images: N0 = min(2.5 T, this image's visual tokens), and the schedule
    averages T over the layers whatever the image's count (solved for the image's own count when it has fewer
    than 2.5 T); an image with no more tokens than T is not pruned."""
    from exporter.autoprune_policy import AutoPrunePolicy
    from prune_core.plan import AutoPruneSection

    executor = PlanExecutor(adapter)
    L = adapter.spec.num_layers
    for tokens in (20, 30):
        policy = AutoPrunePolicy(AutoPruneSection(tokens=tokens), adapter.spec, mode=mode)
        for width, height in SIZES:
            sample = prepare_sample(adapter, _image(width, height), QUESTION)
            visual = sample.image_end - sample.image_start
            result = executor.prefill(sample, policy=policy)
            report = result.policy.report()
            assert report["n0"] == min(int(2.5 * tokens), visual), (tokens, visual)
            per_layer = report["tokens_per_layer"]
            assert per_layer[0] == report["n0"] and len(per_layer) == L
            assert abs(sum(per_layer) / L - tokens) < 0.5, (tokens, visual, per_layer)
            entering = result.visual_tokens_per_layer
            assert entering[0] == visual and entering[1] == report["n0"]
    policy = AutoPrunePolicy(AutoPruneSection(tokens=70), adapter.spec, mode=mode)
    sample = prepare_sample(adapter, _image(150, 60), QUESTION)  # 60 visual tokens, fewer than T = 70
    result = executor.prefill(sample, policy=policy)
    assert result.visual_tokens_per_layer == [60] * L and result.policy.report()["keep"] is None
    torch.testing.assert_close(result.logits, executor.prefill(sample).logits, rtol=0, atol=1e-5)


#: Plans baked into the prefill for images of any size: GSOP operations that prune one image group and not the
#: other (key tokens split off: their count is a quarter of this image's), a fixed schedule (its count capped
#: by this image's), the two combined, and AutoPrune.
BAKED_PLANS = {
    "empty": (frozenset(), None),
    "gsop-split": (frozenset({Operation(1, Group.IMG_REST, Module.KV), Operation(1, Group.IMG_KEY, Module.MLP),
                              Operation(2, Group.IMG_REST, Module.Q), Operation(3, Group.IMG_KEY, Module.KV)}), None),
    "keep": (frozenset(), {1: 40, 2: 12}),
    "keep-more-than-some-images-have": (frozenset(), {1: 70}),
    "combined": (frozenset({Operation(0, Group.IMG_REST, Module.MLP), Operation(3, Group.IMG_KEY, Module.Q),
                            Operation(3, Group.IMG_REST, Module.Q)}), {1: 30}),
}  # fmt: skip


@pytest.mark.parametrize("plan", sorted(BAKED_PLANS))
def test_baked_prefill_takes_each_images_own_visual_count(adapter, plan: str) -> None:
    """One BakedPrefill (the module a build exports) serves images of different sizes, each with its own
    visual token count, and computes what the executor computes for each."""
    from exporter.baked import BakedPrefill

    ops, keep = BAKED_PLANS[plan]
    module = BakedPrefill(adapter, ops, keep).eval()
    executor = PlanExecutor(adapter)
    for width, height in SIZES:
        sample = prepare_sample(adapter, _image(width, height), QUESTION)
        ref = executor.prefill(sample, ops, FixedKeepPolicy(keep) if keep else None)
        with torch.no_grad():
            out = module(*module.inputs_from_sample(sample))
        assert (out[0][0] - ref.logits).abs().max() <= 1e-5, (plan, width, height)
        for layer, cache in enumerate(ref.cache or []):
            keys, pos = out[1 + 3 * layer][0], out[3 + 3 * layer][0]
            order = torch.argsort(pos)
            assert keys.shape[1] == cache.keys.shape[1], (plan, width, height, layer)
            torch.testing.assert_close(keys[:, order], cache.keys, rtol=0, atol=1e-5)


@pytest.mark.parametrize("positions", ["renumbered", "original"])
def test_baked_autoprune_takes_each_images_own_visual_count(adapter, positions: str) -> None:
    from exporter.autoprune_policy import AutoPrunePolicy
    from exporter.baked import AutoPruneBake, BakedPrefill
    from prune_core.plan import AutoPruneSection

    section = AutoPruneSection(tokens=20, positions=positions)  # N0 = 50: below every test image's count
    spec = adapter.spec
    module = BakedPrefill(adapter, autoprune=AutoPruneBake.for_model(section, spec.num_layers, spec.visual_tokens)).eval()
    executor = PlanExecutor(adapter)
    for width, height in SIZES:
        sample = prepare_sample(adapter, _image(width, height), QUESTION)
        ref = executor.prefill(sample, (), AutoPrunePolicy(section, spec, mode="table"))
        with torch.no_grad():
            out = dict(zip(module.output_names, module(*module.inputs_from_sample(sample)), strict=True))
        assert (out["logits"][0] - ref.logits).abs().max() <= 1e-5, (width, height)
        assert out["autoprune.keep"].tolist() == list(ref.policy.report()["keep"])


def test_a_next_deployment_carries_the_tiling_rules(next_builds: dict[str, Path], next_tiny: Path, adapter,
                                                    tmp_path: Path) -> None:
    """The served model packs tiles with its own copy of the tiling rules (Triton's Python backend has no
    prune-export): that copy, read from the repository alone, gives HuggingFace's expansion for every image
    size here, and generation.json carries the geometry of config.json. Served answers: the live Triton test."""
    import importlib.util

    from transformers import AutoProcessor

    code, out = run("deploy", next_builds["autoprune"], "--repo", tmp_path / "repo", "--name", "nx")
    assert code == 0, out
    version = tmp_path / "repo" / "nx" / "1"
    generation = json.loads((version / "generation.json").read_text())
    config = json.loads((next_tiny / "config.json").read_text())
    geometry = generation["any_resolution"]
    assert geometry["image_grid_pinpoints"] == config["image_grid_pinpoints"]
    assert geometry["image_size"] == config["vision_config"]["image_size"] and generation["autoprune_n0"] == 50
    loaded = importlib.util.spec_from_file_location("served_anyres", version / "prune_export_anyres.py")
    served = importlib.util.module_from_spec(loaded)
    sys.modules["served_anyres"] = served  # as the orchestrator imports it (dataclasses look the module up)
    try:
        loaded.loader.exec_module(served)
    finally:
        del sys.modules["served_anyres"]
    tiling = served.Tiling(geometry["image_size"], geometry["patch_size"],
                           tuple(tuple(p) for p in geometry["image_grid_pinpoints"]))  # fmt: skip
    processor = AutoProcessor.from_pretrained(str(version / "processor"))  # the deployed processor
    for width, height in [*SIZES, (300, 20), (20, 300), (97, 101)]:
        ids = processor(images=_image(width, height), text=adapter.prompt_text(QUESTION), return_tensors="np")["input_ids"]
        assert len(tiling.pack_index(height, width)) == int((ids == adapter.image_token_id).sum()), (width, height)
        assert tiling.pack_index(height, width) == adapter.spec.pack_index(height, width)


def test_an_autoprune_build_refuses_an_image_with_fewer_tokens_than_its_n0(next_builds: dict[str, Path],
                                                                           adapter, tmp_path: Path) -> None:
    """The graph holds the schedule of images with at least N0 = 2.5 T tokens (50 for T=20); a thin image
    (16 tokens here) would need another schedule, so the build refuses it rather than answer differently from
    the executor."""
    assert adapter.spec.visual_tokens_for(10, 1000) < 50
    _image(1000, 10).save(tmp_path / "thin.png")
    code, out = run("run", next_builds["autoprune"], "--image", tmp_path / "thin.png", "--question", QUESTION)
    assert_clean_error(code, out, "fewer than the AutoPrune build's N0 = 50")


#: A chat template in the shape llava-v1.6-mistral-7b-hf uses ("[INST] <image>\nQUESTION [/INST]"), written here.
MISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% else %}{{ ' ' + m['content'][0]['text'] + '</s>' }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def next_mistral(next_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-NeXT with a Mistral decoder (GQA: 2 KV heads of 4, head_dim 24 where hidden / heads is 16) and a
    Mistral-style chat template, made with HuggingFace's classes from next-tiny's tower and processor."""
    import copy

    from transformers import AutoProcessor, LlavaNextForConditionalGeneration, MistralConfig

    base = LlavaNextForConditionalGeneration.from_pretrained(str(next_tiny))
    processor = AutoProcessor.from_pretrained(str(next_tiny))
    tok = processor.tokenizer
    config = copy.deepcopy(base.config)
    config.text_config = MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, vocab_size=base.config.text_config.vocab_size, max_position_embeddings=4096,
        sliding_window=4096, rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(4)
    model = LlavaNextForConditionalGeneration(config).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    processor.chat_template = MISTRAL_TEMPLATE
    folder = tmp_path_factory.mktemp("next-mistral") / "m"
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def test_a_mistral_gqa_next_model_matches_huggingface(next_mistral: Path) -> None:
    """llava-v1.6-mistral's shape of model: the spec reads the Mistral decoder (GQA, head_dim), the prompt is
    the folder's chat template, and the executor's logits (every row), caches and greedy answers equal
    HuggingFace's forward and ``generate`` at a wide and a tall image."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    adapter = load_adapter(next_mistral)
    spec = adapter.spec
    assert (spec.family, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("llava_next", 4, 2, 24)
    assert adapter.model.model.language_model.config.model_type == "mistral"
    assert adapter.prompt_text(QUESTION) == f"[INST] <image>\n{QUESTION} [/INST]"
    processor = AutoProcessor.from_pretrained(str(next_mistral))
    reference = LlavaNextForConditionalGeneration.from_pretrained(str(next_mistral), attn_implementation="eager").eval()
    reference64 = LlavaNextForConditionalGeneration.from_pretrained(str(next_mistral), attn_implementation="eager",
                                                                    dtype=torch.float64).eval()  # fmt: skip
    for width, height in SIZES[1:]:
        image = _image(width, height, seed=2)
        inputs = processor(images=image, text=f"[INST] <image>\n{QUESTION} [/INST]", return_tensors="pt")
        sample = prepare_sample(adapter, image, QUESTION)
        assert torch.equal(sample.input_ids, inputs["input_ids"][0])  # the chat template's prompt
        n = sample.num_tokens
        result = PlanExecutor(adapter).prefill(sample, logits_rows=n)
        with torch.no_grad():
            out = reference(**inputs, use_cache=True)
            out64 = reference64(**{**inputs, "pixel_values": inputs["pixel_values"].double()}, use_cache=True)
        bound = max(1e-5, 2 * float((out.logits[0].double() - out64.logits[0]).abs().max()))
        assert bound < 1e-3 and out.logits[0].abs().max() > 1e-2
        torch.testing.assert_close(result.row_logits, out.logits[0], rtol=0, atol=bound)
        for layer, cache in enumerate(result.cache or []):
            torch.testing.assert_close(cache.keys, out.past_key_values.layers[layer].keys[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(cache.values, out.past_key_values.layers[layer].values[0], rtol=0, atol=1e-5)
        hf = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0][n:].tolist()
        ours = PlanExecutor(adapter).generate(sample, max_new_tokens=8).token_ids
        assert ours == hf[: len(ours)] and len(ours) in (len(hf), len(hf) - 1), (width, height)


def test_a_mistral_gqa_next_model_builds_and_answers_as_the_executor(next_mistral: Path, tmp_path: Path) -> None:
    """The graphs of a GQA decoder with head_dim != hidden / heads behind any-resolution tiles: a GSOP build
    that splits key and other visual tokens passes its check (logits and caches against the executor, greedy
    answers through the runtime) and answers a wide image with the executor's tokens under the same plan."""
    from exporter.executor import PlanExecutor as Executor
    from prune_core.ops import Operation as Op

    adapter = load_adapter(next_mistral)
    spec = adapter.spec
    ops = [Op(layer, Group.IMG_REST, m) for layer in (1, 2) for m in Module]
    plan = tmp_path / "plan.json"
    Plan.new(spec, GroupSizes.default(spec), [ops]).save(plan)
    code, text = run("build", next_mistral, "--out", tmp_path / "b", "--plan", plan, "--budget", "0.9")
    assert code == 0 and "check passed" in text, text
    from prune_core.manifest import Manifest

    assert len(Manifest.load(tmp_path / "b").plan["ops"]) == len(ops)  # the whole step is baked in
    image = _image(150, 60, seed=9)
    image.save(tmp_path / "wide.png")
    code, out = run("run", tmp_path / "b", "--image", tmp_path / "wide.png", "--question", QUESTION,
                    "--max-new-tokens", 6, "--json")  # fmt: skip
    assert code == 0, out
    sample = prepare_sample(adapter, image, QUESTION)
    ids = Executor(adapter).generate(sample, frozenset(ops), max_new_tokens=6).token_ids
    assert json.loads(out)["answer"] == adapter.decode([i for i in ids if i not in adapter.eos_token_ids])


def test_every_model_command_runs_on_next_tiny(next_tiny: Path, next_builds: dict[str, Path], mixed_data: Path,
                                               tmp_path: Path) -> None:
    """`demo-model`, `search`, `autoprune-schedule`, `sweep` and `bench` on next-tiny, with images of three sizes:
    the searched plan is for this model and evaluates; the schedule holds the budget at the largest image;
    the sweep's rows equal `eval` of the same options; the bench counts the image size it was given."""
    code, out = run("demo-model", tmp_path / "m", "--preset", "next-tiny")
    assert code == 0, out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llava_next"
    assert load_spec(tmp_path / "m") == load_spec(next_tiny)

    plan = tmp_path / "plan.json"
    code, out = run("search", next_tiny, "--calib", mixed_data, "--out", plan, "--metric", "kl", "--steps", 2)
    assert code == 0, out
    searched = Plan.load(plan)
    assert searched.doc.steps and searched.spec == load_spec(next_tiny)

    code, out = run("autoprune-schedule", next_tiny, "--tokens", 20, "--k", 0.2, "--json")
    assert code == 0, out
    schedule = json.loads(out)
    assert (schedule["visual_tokens"], schedule["n0"]) == (88, 50) and abs(schedule["mean"] - 20) < 1e-9

    report = tmp_path / "sweep"
    code, out = run("sweep", next_tiny, "--data", mixed_data, "--out", report, "--autoprune-tokens", 20,
                    "--keep-schedule", "1:30", "--max-new-tokens", 3)  # fmt: skip
    assert code == 0, out
    rows = {row["name"]: row for row in json.loads((report / "report.json").read_text())["configs"]}
    code, out = run("eval", next_tiny, "--data", mixed_data, "--keep-schedule", "1:30", "--max-new-tokens", 3, "--json")
    direct = json.loads(out)
    keep_row = rows["fixed-1x30"]
    assert keep_row["agreement"] == direct["agreement"] and keep_row["flops_ratio"] == pytest.approx(direct["flops_ratio"])
    assert len(rows) == 3  # dense, AutoPrune T=20, the fixed schedule

    code, out = run("bench", next_builds["keep"], "--baseline", next_builds["dense"], "--image-size", "112x112",
                    "--runs", 1, "--warmup", 0, "--json")  # fmt: skip
    assert code == 0, out
    bench = json.loads(out)
    visual = load_spec(next_tiny).visual_tokens_for(112, 112)
    assert bench["prompt_tokens"] > visual and bench["flops_speedup"] > 1.0

"""Random-initialised LLaVA-1.5-architecture models that load offline, for tests, demos and benchmarks.

``tiny`` builds in well under a second (CLIP 56 px / patch 14 -> 16 visual tokens, decoder hidden 64,
4 layers). ``bench`` has LLaVA-1.5's token geometry (336 px, patch 14 -> 576 visual tokens) and a decoder
big enough that matmuls dominate prefill time (hidden 1024, MLP 2816, 8 layers, 16 heads).
The tokenizer is a byte-level BPE trained in code on a small built-in corpus, so any text tokenizes.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from prune_core.errors import PruneExportError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

_CORPUS = """
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is the color of the cat in the picture? ASSISTANT: The cat is black.
USER: How many dogs are there? ASSISTANT: There are two dogs.
USER: Is there a red car on the left side of the street? ASSISTANT: Yes.
USER: What shape is the sign? ASSISTANT: It is a square sign.
Answer the question using a single word or phrase.
red green blue yellow orange purple pink brown black white gray
one two three four five six seven eight nine ten zero
yes no left right top bottom middle front back above below
cat dog car bus tree house person man woman child table chair bird horse
circle square triangle rectangle star line
what which where who how many is are there the a an of in on at with
"""


@dataclass(frozen=True)
class DemoPreset:
    """Sizes of a demo model; every field maps onto a HuggingFace config field."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # target size of the BPE tokenizer trained in code (the small corpus may give fewer)
    lm_vocab: int | None = None  # decoder vocabulary, padded past the tokenizer; None: the tokenizer's size


PRESETS: dict[str, DemoPreset] = {
    "tiny": DemoPreset(56, 14, 32, 64, 3, 4, 64, 128, 4, 4, 4, 400),
    "bench": DemoPreset(336, 14, 256, 1024, 4, 4, 1024, 2816, 8, 16, 16, 2000),
    # LLaVA-1.5-7B's shapes (CLIP ViT-L/336, Vicuna-7B): ~7.1B parameters, 14 GB in fp16. Built directly in
    # fp16 (random_llava(dtype=torch.float16), demo-model --preset llava-7b): an fp32 copy would be 28 GB.
    "llava-1.5-7b": DemoPreset(336, 14, 1024, 4096, 24, 16, 4096, 11008, 32, 32, 32, 2000, lm_vocab=32064),
}
PRESETS["llava-7b"] = PRESETS["llava-1.5-7b"]  # the name the CLI offers
#: LLaVA-1.6's tiling resolutions (height, width), in units of the vision tower's image size (336 px there).
NEXT_GRID = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
#: LLaVA-NeXT presets: the LLaVA-1.5 preset they share sizes with. ``next-bench`` at a 672x672 image gives
#: LLaVA-1.6-7B's 2,928 visual tokens; ``next-tiny`` (56 px tiles of 16 patches) at most 88; ``next-7b`` is
#: llava-v1.6-vicuna-7b's shapes (LLaVA-1.5-7B's plus the ``image_newline`` vector), made in fp16.
NEXT_PRESETS: dict[str, str] = {"next-tiny": "tiny", "next-bench": "bench", "next-7b": "llava-1.5-7b"}
for _name, _base in NEXT_PRESETS.items():
    PRESETS[_name] = PRESETS[_base]
#: The precision a preset is written in when none is asked for: the 7B shapes only ever in fp16.
DEFAULT_DTYPES: dict[str, torch.dtype] = {"llava-1.5-7b": torch.float16, "llava-7b": torch.float16,
                                          "next-7b": torch.float16}


def _train_tokenizer(vocab_size: int, corpus: str = _CORPUS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in corpus.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 20, trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def random_llava(
    preset: str = "tiny",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    corpus: str = _CORPUS,
    **overrides: int,
):
    """A random LLaVA-1.5-architecture ``(model, processor)`` built in memory, directly on ``device`` in
    ``dtype`` (a 7B-shaped model never passes through fp32 host memory).

    ``overrides`` replace preset fields (e.g. ``kv_heads=2`` for a GQA model); ``corpus`` is the text the
    byte-level BPE tokenizer is trained on (one sentence per line). The vision tower uses eager
    attention (it must return the [CLS] attention), the decoder sdpa, as :meth:`LlavaAdapter.load` sets them.
    Weights depend on ``seed`` and the device's random generator.
    """
    if preset not in PRESETS:
        raise PruneExportError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = replace(PRESETS[preset], **overrides)
    from .adapters.llava import _quiet_transformers

    _quiet_transformers()
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _train_tokenizer(p.vocab, corpus)
    vision = CLIPVisionConfig(
        hidden_size=p.vision_hidden,
        intermediate_size=p.vision_intermediate,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=p.image_size,
        patch_size=p.patch_size,
        projection_dim=p.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        vocab_size=max(len(tokenizer), p.lm_vocab or 0),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                  vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")  # fmt: skip
    next_pins = [[h * p.image_size, w * p.image_size] for h, w in NEXT_GRID] if preset in NEXT_PRESETS else None
    if next_pins is not None:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        config = LlavaNextConfig(**common, image_grid_pinpoints=next_pins)
        model_class: Any = LlavaNextForConditionalGeneration
    else:
        config = LlavaConfig(**common)
        model_class = LlavaForConditionalGeneration
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "sdpa"
    generator_state = torch.random.get_rng_state()
    default_dtype = torch.get_default_dtype()
    try:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = model_class(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
        torch.random.set_rng_state(generator_state)
    model.requires_grad_(False)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if next_pins is not None:
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        next_processor = LlavaNextImageProcessor(
            size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size, "width": p.image_size},
            image_grid_pinpoints=next_pins,
        )  # fmt: skip
        return model, LlavaNextProcessor(image_processor=next_processor, tokenizer=tokenizer, patch_size=p.patch_size,
                                         vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size, "width": p.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's [CLS]; "default" drops it again
    )
    return model, processor


#: The trained demo model shipped with the package (scripts/train_demo_model.py wrote it).
TRAINED_DIR = Path(__file__).resolve().parent / "demo_models" / "trained"
#: Files of the shipped folder that make up the model (the training log goes along as its record).
#: The weights are two shards of under 4 MB (save_pretrained's max_shard_size="4MB"), byte for byte the trained tensors.
_TRAINED_FILES = ("config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                  "model-00002-of-00002.safetensors", "model.safetensors.index.json", "processor_config.json",
                  "tokenizer.json", "tokenizer_config.json", "training_log.json")  # fmt: skip


def build_demo_model(
    out_dir: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False,
    dtype: torch.dtype | None = None, max_shard_size: str = "2GB", **overrides: int,
) -> Path:  # fmt: skip
    """Write a LLaVA-1.5-architecture demo model with tokenizer and processor to ``out_dir``.

    ``preset="trained"`` copies the model trained on the demo VQA task (:data:`TRAINED_DIR`); it takes no
    ``seed``, ``dtype`` or overrides. Any other preset is random: ``overrides`` replace preset fields (e.g.
    ``kv_heads=2`` for a GQA model), the weights are created in ``dtype`` (default: fp32, fp16 for the 7B
    preset) and written as safetensors shards of at most ``max_shard_size``, so a 7B model needs its 14 GB
    once plus one shard, never an fp32 copy. The folder is written atomically: built in a temporary sibling
    folder, then renamed.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PruneExportError(f"{out} exists and is not empty; pass --overwrite or choose another folder")
    if preset == "trained":
        changed = [name for name, given in (("--seed", seed != 0), ("--dtype", dtype is not None),
                                            *((f"--{k.replace('_', '-')}", True) for k in overrides)) if given]  # fmt: skip
        if changed:
            raise PruneExportError(f"the trained preset is fixed weights; {', '.join(changed)} do(es) not apply to it")
        missing = [name for name in _TRAINED_FILES if not (TRAINED_DIR / name).is_file()]
        if missing:
            raise PruneExportError(f"the trained demo model is incomplete in {TRAINED_DIR} (missing {', '.join(missing)}); "
                                   "reinstall prune-export or run scripts/train_demo_model.py")  # fmt: skip
    else:
        dtype = dtype if dtype is not None else DEFAULT_DTYPES.get(preset, torch.float32)
        model, processor = random_llava(preset, seed, dtype=dtype, **overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if preset == "trained":
            for name in _TRAINED_FILES:
                shutil.copyfile(TRAINED_DIR / name, tmp / name)
        else:
            model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
            processor.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_demo_data(out_dir: str | Path, samples: int = 8, seed: int = 0, image_size: int = 224) -> Path:
    """Write ``samples`` rows of the demo VQA task (:mod:`exporter.demo_scenes`) as JSONL + PNGs.

    Question kinds are taken in turn (color, shape, count, side, exists), so every kind is a fifth of the
    set; each row also holds its ``kind``. Returns the JSONL path. Images are drawn in code, so the data set
    needs no download; another ``seed`` gives a fresh set of the same task.
    """
    import json
    import random

    from prune_core.io import atomic_write_text

    from .demo_scenes import KINDS, draw_scene, make_question

    if samples < 1:
        raise PruneExportError(f"--samples must be >= 1, got {samples}")
    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(samples):
        kind = KINDS[i % len(KINDS)]
        scene, question = make_question(kind, rng)
        name = f"images/{i:04d}.png"
        draw_scene(scene, image_size).save(out / name)
        lines.append(json.dumps({"image": name, "question": question.question, "answer": question.answer, "kind": kind}))
    path = out / "data.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

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
#: The precision a preset is written in when none is asked for: the 7B shapes only ever in fp16.
DEFAULT_DTYPES: dict[str, torch.dtype] = {"llava-1.5-7b": torch.float16, "llava-7b": torch.float16}


def _train_tokenizer(vocab_size: int):
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
    lines = [line for line in _CORPUS.strip().splitlines() if line.strip()]
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
    **overrides: int,
):
    """A random LLaVA-1.5-architecture ``(model, processor)`` built in memory, directly on ``device`` in
    ``dtype`` (a 7B-shaped model never passes through fp32 host memory).

    ``overrides`` replace preset fields (e.g. ``kv_heads=2`` for a GQA model). The vision tower uses eager
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

    tokenizer = _train_tokenizer(p.vocab)
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
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "sdpa"
    generator_state = torch.random.get_rng_state()
    default_dtype = torch.get_default_dtype()
    try:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
        torch.random.set_rng_state(generator_state)
    model.requires_grad_(False)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
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


def build_demo_model(
    out_dir: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False,
    dtype: torch.dtype | None = None, max_shard_size: str = "2GB", **overrides: int,
) -> Path:  # fmt: skip
    """Write a random LLaVA-1.5-architecture model with tokenizer and processor to ``out_dir``.

    ``overrides`` replace preset fields (e.g. ``kv_heads=2`` for a GQA model). The weights are created in
    ``dtype`` (default: fp32, fp16 for the 7B preset) and written as safetensors shards of at most
    ``max_shard_size``, so a 7B model needs its 14 GB once plus one shard, never an fp32 copy. The folder is
    written atomically: built in a temporary sibling folder, then renamed.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PruneExportError(f"{out} exists and is not empty; pass --overwrite or choose another folder")
    dtype = dtype if dtype is not None else DEFAULT_DTYPES.get(preset, torch.float32)
    model, processor = random_llava(preset, seed, dtype=dtype, **overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        processor.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
_SHAPES = ("square", "circle")


def build_demo_data(out_dir: str | Path, samples: int = 8, seed: int = 0, image_size: int = 96) -> Path:
    """Write ``samples`` synthetic VQA rows (a coloured shape; "what color is the ...?") as JSONL + PNGs.

    Returns the JSONL path. Images are drawn in code, so the data set needs no download.
    """
    import json
    import random

    from PIL import Image, ImageDraw

    from prune_core.io import atomic_write_text

    if samples < 1:
        raise PruneExportError(f"--samples must be >= 1, got {samples}")
    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(samples):
        color = rng.choice(sorted(_COLORS))
        shape = rng.choice(_SHAPES)
        background = tuple(rng.randrange(0, 256) for _ in range(3))
        img = Image.new("RGB", (image_size, image_size), background)
        draw = ImageDraw.Draw(img)
        a = rng.randrange(4, image_size // 3)
        b = rng.randrange(image_size // 2, image_size - 4)
        box = (a, a, b, b)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=_COLORS[color])
        name = f"images/{i:04d}.png"
        img.save(out / name)
        lines.append(json.dumps({"image": name, "question": f"What color is the {shape}?", "answer": color}))
    path = out / "data.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

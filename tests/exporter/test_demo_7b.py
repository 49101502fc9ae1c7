"""The llava-7b demo preset: LLaVA-1.5-7B's configuration and tensor shapes, and fp16 shards on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from exporter.demo import random_llava
from prune_export.cli import main


def test_llava_7b_preset_has_llava_1_5_7b_shapes() -> None:
    """Built on the meta device: every shape, no memory. Reference: LLaVA-1.5-7B's published config."""
    model, processor = random_llava("llava-7b", dtype=torch.float16, device="meta")
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (4096, 11008, 32)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (32, 32, 32064)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float16 and p.device.type == "meta" for p in params.values())
    total = sum(p.numel() for p in params.values())
    assert abs(total - 7.06e9) < 0.01e9  # 7.06 B: CLIP ViT-L/336 (0.30 B) + projector (0.02 B) + Vicuna-7B (6.74 B)
    layer = "model.language_model.layers.0"
    assert tuple(params[f"{layer}.self_attn.q_proj.weight"].shape) == (4096, 4096)
    assert tuple(params[f"{layer}.mlp.gate_proj.weight"].shape) == (11008, 4096)
    assert tuple(params["lm_head.weight"].shape) == (32064, 4096)
    assert tuple(params["model.multi_modal_projector.linear_1.weight"].shape) == (4096, 1024)
    assert (336 // 14) ** 2 == 576 and processor.patch_size == 14


def test_demo_model_writes_fp16_shards(tmp_path: Path) -> None:
    """A 7B-wide model with 2 decoder layers through the CLI: fp16 safetensors, sharded, config says fp16."""
    from safetensors import safe_open

    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["demo-model", str(out), "--preset", "llava-7b", "--layers", "2"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 4096 and config["text_config"]["num_hidden_layers"] == 2
    files = sorted(out.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) > 1.9e9  # ~0.99 B parameters x 2 bytes
    for file in files:
        with safe_open(str(file), "pt") as fh:
            assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}


def test_next_7b_preset_has_llava_1_6_vicuna_7b_shapes(tmp_path: Path) -> None:
    """Reference: llava-v1.6-vicuna-7b-hf's published config and processor: LLaVA-1.5-7B's tensors plus the
    4096-wide image_newline, tiled at 336x672, 672x336, 672x672, 1008x336 and 336x1008 (2,928 visual tokens
    at 672x672: 576 for the base image, 48 x 48 for the 2x2 grid, 48 newline tokens)."""
    from exporter.adapters import load_spec

    model, processor = random_llava("next-7b", dtype=torch.float16, device="meta")
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert abs(total - 7.06e9) < 0.01e9 and tuple(params["model.image_newline"].shape) == (4096,)
    assert all(p.dtype == torch.float16 for p in params.values())
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert model.config.image_grid_pinpoints == pins and processor.image_processor.image_grid_pinpoints == pins
    model.config.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    spec = load_spec(tmp_path)
    assert spec.visual_tokens == spec.visual_tokens_for(672, 672) == 576 + 48 * 48 + 48 == 2928
    assert (spec.num_layers, spec.hidden_size, spec.vocab_size) == (32, 4096, 32064)

"""Helpers for CLI tests: run a command in click's runner, and check a user error is one clean line."""

from __future__ import annotations

from click.testing import CliRunner

from prune_export.cli import main

#: llava-hf/llava-1.5-7b-hf's config.json: it relies on Llama defaults for the decoder sizes.
LLAVA_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
    "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768},
}


def run(*args: object) -> tuple[int, str]:
    """Exit code and output of ``prune-export ARGS``; an unexpected exception is re-raised."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_clean_error(code: int, output: str, needle: str) -> None:
    """A failing command printed exactly one line, containing ``needle``, and no traceback."""
    assert code != 0
    assert "Traceback" not in output
    assert needle in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output

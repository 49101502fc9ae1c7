"""Adapter for HuggingFace ``LlavaForConditionalGeneration`` folders (the LLaVA-1.5 family).

Layout in transformers 5.x: ``model.model.{vision_tower, multi_modal_projector, language_model}`` and
``model.lm_head``; the decoder is Llama-style (pre-RMSNorm, RoPE, gated SiLU MLP, GQA allowed): Llama,
Mistral (``head_dim`` may differ from ``hidden_size / heads``) or Qwen2 (biases on Q/K/V). A sliding attention
window a prompt could outgrow is refused (:func:`sliding_window_of`); the executor attends to the whole prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prune_core.errors import ModelLoadError
from prune_core.prompt import prompt_text
from prune_core.spec import ModelSpec

from .base import LayerParts, PromptTokens, VisionOutput, VLMAdapter

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _quiet_transformers() -> None:
    # transformers logs a torchvision fallback notice for every CLIP processor; it is not actionable here.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass


class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5: CLIP vision tower, MLP projector, Llama/Vicuna decoder."""

    model_types = ("llava",)
    #: The transformers classes of the folder's config and model, and the family's name in messages.
    hf_config_class = "LlavaConfig"
    hf_model_class = "LlavaForConditionalGeneration"
    family_name = "LLaVA"

    def __init__(self, folder: Path, model: Any, processor: Any, spec: ModelSpec) -> None:
        self.folder = folder
        self.model = model
        self.processor = processor
        self.spec = spec
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        cfg = model.config
        self._lm = model.model.language_model
        self._feature_layer = cfg.vision_feature_layer
        self._strategy = cfg.vision_feature_select_strategy
        self.image_token_id = int(cfg.image_token_index)
        self._layers = [
            LayerParts(
                attn_norm=layer.input_layernorm,
                q_proj=layer.self_attn.q_proj,
                k_proj=layer.self_attn.k_proj,
                v_proj=layer.self_attn.v_proj,
                o_proj=layer.self_attn.o_proj,
                mlp_norm=layer.post_attention_layernorm,
                gate_proj=layer.mlp.gate_proj,
                up_proj=layer.mlp.up_proj,
                down_proj=layer.mlp.down_proj,
                act=layer.mlp.act_fn,
                scaling=float(layer.self_attn.scaling),
            )
            for layer in self._lm.layers
        ]
        tok = processor.tokenizer
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos.update(gen_eos)
        self._eos = tuple(sorted(eos))

    # -- config only -----------------------------------------------------------------------------------
    @classmethod
    def _hf_config(cls, folder: Path) -> Any:
        _quiet_transformers()
        import transformers

        try:
            return getattr(transformers, cls.hf_config_class).from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(f"{folder}/config.json is not a loadable {cls.family_name} config: {exc}") from None

    @classmethod
    def spec_from_config(cls, folder: Path, config: dict[str, Any]) -> ModelSpec:
        return cls.spec_from_hf_config(cls._hf_config(folder), str(folder))

    @classmethod
    def spec_from_hf_config(cls, cfg: Any, folder: str = "the model") -> ModelSpec:
        """The architecture of a loaded ``LlavaConfig`` (``folder`` names it in errors)."""
        tc, vc = cfg.text_config, cfg.vision_config
        if not isinstance(cfg.vision_feature_layer, int):
            raise ModelLoadError(
                f"{folder}: vision_feature_layer={cfg.vision_feature_layer!r} (several layers) is not supported; "
                "LLaVA-1.5 uses a single layer (-2)"
            )
        if getattr(tc, "model_type", "llama") not in ("llama", "mistral", "qwen2"):
            raise ModelLoadError(
                f"{folder}: text model type {tc.model_type!r} is not supported by the LLaVA adapter "
                "(llama, mistral, qwen2 decoders are)"
            )
        _refuse_sliding_window(tc, folder)
        patches = (vc.image_size // vc.patch_size) ** 2
        visual = patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        return ModelSpec(
            family="llava",
            num_layers=tc.num_hidden_layers,
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=tc.vocab_size,
            visual_tokens=visual,
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            vision_layers=vc.num_hidden_layers,
            vision_hidden_size=vc.hidden_size,
        )

    @classmethod
    def sys_tokens_from_folder(cls, folder: Path) -> int | None:
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return None
        _quiet_transformers()
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception:
            return None
        prefix = prompt_text(tok, "?").split("<image>")[0]
        return len(tok(prefix).input_ids)

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlavaAdapter:
        spec = cls.spec_from_config(folder, {})
        if not any((folder / f).is_file() for f in WEIGHT_FILES):
            raise ModelLoadError(
                f"{folder} holds a config but no weights ({' / '.join(WEIGHT_FILES[::2])}); "
                "commands that run the model need the full folder ('info' works from config.json alone)"
            )
        _quiet_transformers()
        import transformers
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"{folder}: could not load the tokenizer/image processor ({type(exc).__name__}: {exc}); "
                "the folder needs tokenizer and processor files saved with save_pretrained"
            ) from None
        cls.check_processor(processor, spec, folder)
        try:
            model = getattr(transformers, cls.hf_model_class).from_pretrained(
                str(folder),
                local_files_only=True,
                dtype=dtype,
                # The vision tower must be eager to return the [CLS] attention; the decoder is ours.
                attn_implementation={"vision_config": "eager", "text_config": "sdpa", "": "sdpa"},
            )
        except Exception as exc:
            raise ModelLoadError(f"{folder}: could not load the weights ({type(exc).__name__}: {exc})") from None
        model = model.to(device).eval()
        model.requires_grad_(False)
        return cls(folder, model, processor, spec)

    @classmethod
    def from_model(cls, model: Any, processor: Any, folder: Path | None = None) -> LlavaAdapter:
        """Wrap a ``LlavaForConditionalGeneration`` already in memory (its vision tower must use eager
        attention, which returns the [CLS] attention), e.g. a random model built on a GPU for benchmarks."""
        spec = cls.spec_from_hf_config(model.config)
        cls.check_processor(processor, spec, folder or "the processor")
        model.eval().requires_grad_(False)
        return cls(folder or Path("<in memory>"), model, processor, spec)

    @classmethod
    def check_processor(cls, processor: Any, spec: ModelSpec, folder: Any) -> None:
        """Refuse a processor that does not prepare images as the model expects (nothing to check here)."""

    # -- prompt ----------------------------------------------------------------------------------------
    def prompt_text(self, question: str) -> str:
        return prompt_text(self.processor, question)

    def tokenize(self, image: Any, question: str) -> PromptTokens:
        inputs = self.processor(images=image.convert("RGB"), text=self.prompt_text(question), return_tensors="pt")
        ids = inputs["input_ids"][0]
        where = (ids == self.image_token_id).nonzero().flatten()
        if len(where) != self.spec.visual_tokens:
            raise ModelLoadError(
                f"the processor expanded <image> into {len(where)} tokens but the vision tower yields "
                f"{self.spec.visual_tokens}; check patch_size / num_additional_image_tokens in processor_config.json"
            )
        start, end = int(where[0]), int(where[-1]) + 1
        return PromptTokens(ids, start, end, inputs["pixel_values"].to(self.device, self.dtype))

    # -- compute ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisionOutput:
        tower = self.model.model.vision_tower
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=True)
        hidden = out.hidden_states[self._feature_layer]
        attn = out.attentions[self._feature_layer]  # [B, heads, 1+P, 1+P]; hidden_states[i] is attentions[i]'s output
        cls_row = attn[:, :, 0, :].float().mean(dim=1)  # [B, 1+P]
        if self._strategy == "default":
            hidden, cls_row = hidden[:, 1:], cls_row[:, 1:]
        features = self.model.model.multi_modal_projector(hidden)
        return VisionOutput(features=features, cls_attention=cls_row)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._lm.embed_tokens(input_ids.to(self.device))

    @property
    def layers(self) -> Sequence[LayerParts]:
        return self._layers

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self._lm.rotary_emb(dummy, positions.to(self.device).view(1, -1))
        return cos[0], sin[0]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm.norm(hidden)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.processor.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def save_preprocessing(self, folder: Path) -> None:
        self.processor.save_pretrained(str(folder))


def sliding_window_of(text_config: Any) -> int | None:
    """The attention window HuggingFace applies in at least one decoder layer, or None (full causal attention).

    Mistral windows every layer when ``sliding_window`` is set; Qwen2 only with ``use_sliding_window`` and only
    the layers ``layer_types`` marks ``sliding_attention`` (``i >= max_window_layers``); Llama has no window.
    """
    window = getattr(text_config, "sliding_window", None)
    if window is None:
        return None
    if getattr(text_config, "model_type", None) == "qwen2":
        if not getattr(text_config, "use_sliding_window", False):
            return None
        layer_types = getattr(text_config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
    return int(window)


def _refuse_sliding_window(text_config: Any, folder: str) -> None:
    """The executor and the exported graphs attend to every earlier token: a window that a prompt could
    outgrow (narrower than ``max_position_embeddings``) would make them differ from the model, so refuse it."""
    window = sliding_window_of(text_config)
    limit = getattr(text_config, "max_position_embeddings", None)
    if window is None or (limit is not None and window >= limit):
        return
    qwen = getattr(text_config, "model_type", None) == "qwen2"
    setting = f"sliding_window={window}" + (", use_sliding_window=true" if qwen else "")
    fix = '"sliding_window": null' + (' (or "use_sliding_window": false)' if qwen else "")
    raise ModelLoadError(
        f"{folder}: the {text_config.model_type} decoder uses sliding-window attention (text_config {setting}, "
        f"max_position_embeddings={limit}), which prune-export does not implement: its executor and graphs attend "
        f"to every earlier token and would differ from the model on contexts longer than {window} tokens. If the "
        f"model never sees a context longer than {window} tokens (a LLaVA prompt with one image is ~600-700), set "
        f"{fix} in text_config of config.json; otherwise this model is not supported"
    )

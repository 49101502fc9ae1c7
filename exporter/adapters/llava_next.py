"""Adapter for HuggingFace ``LlavaNextForConditionalGeneration`` folders (LLaVA-NeXT / LLaVA-1.6).

The decoder is LLaVA-1.5's (Llama/Vicuna or Mistral, MHA or GQA) and so is everything the executor calls on
it; what differs is the image. LLaVA-NeXT tiles an image at the best-fitting resolution of
``image_grid_pinpoints``: the vision tower runs on a base image (the whole picture at the tower's size) and
on every tile; the tiles' features are joined into one grid, the rows or columns that only hold padding are
removed (``unpad``, so the grid keeps the image's aspect ratio), and a learned ``image_newline`` token ends
every row. The number of visual tokens therefore depends on the image size: 576 + 2,352 = 2,928 at most for
LLaVA-1.6-7B (a 672x672 image), fewer for other shapes.

Features are packed by HuggingFace's own ``pack_image_features``, so the order is the model's. GSOP's key
tokens need one [CLS] attention score per visual token: each tile's patches get its own tile's [CLS]
attention (the base image's for the base tokens), packed the same way; the newline tokens are not patches and
get 0 (they are never key tokens). docs/methods.md, "LLaVA-NeXT", states every such choice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from prune_core.errors import ModelLoadError
from prune_core.spec import ModelSpec

from .base import PromptTokens, VisionOutput
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: CLIP vision tower on a base image and its tiles, MLP projector, ``image_newline``,
    Llama/Vicuna or Mistral decoder."""

    model_types = ("llava_next",)

    hf_config_class = "LlavaNextConfig"
    family_name = "LLaVA-NeXT"

    # -- config only -----------------------------------------------------------------------------------
    @classmethod
    def spec_from_hf_config(cls, cfg: Any, folder: str = "the model") -> ModelSpec:
        base = LlavaAdapter.spec_from_hf_config(cfg, folder)
        pins = getattr(cfg, "image_grid_pinpoints", None)
        if not pins:
            raise ModelLoadError(
                f"{folder}: config.json has no image_grid_pinpoints, which LLaVA-NeXT tiles every image by; add "
                "the checkpoint's list (LLaVA-1.6: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])"
            )
        if cfg.vision_feature_select_strategy != "default":
            raise ModelLoadError(
                f"{folder}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; LLaVA-NeXT's tiles "
                "are square grids of patches without [CLS] ('default'), which is what prune-export supports"
            )
        size = base.image_size
        if any(int(h) % size or int(w) % size for h, w in pins):
            raise ModelLoadError(f"{folder}: image_grid_pinpoints {pins} are not multiples of the vision tower's "
                                 f"image size {size}; every tile must be one tower input")
        tiled = replace(base, family="llava_next", image_grid_pinpoints=tuple((int(h), int(w)) for h, w in pins))
        # An image of a pinpoint's own shape fills its grid (nothing to unpad): the most tokens at that grid.
        return replace(tiled, visual_tokens=max(tiled.visual_tokens_for(h, w) for h, w in tiled.image_grid_pinpoints))

    # -- loading (LlavaAdapter.load and from_model, with this class and processor check) -----------------
    hf_model_class = "LlavaNextForConditionalGeneration"

    @classmethod
    def check_processor(cls, processor: Any, spec: ModelSpec, folder: Any) -> None:
        """The image processor must tile as the model does: its grid pinpoints are the config's."""
        pins = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
        if not pins:
            raise ModelLoadError(
                f"{folder}: the image processor has no image_grid_pinpoints, so it cannot tile images as LLaVA-NeXT "
                "does; save the checkpoint's LlavaNextImageProcessor (preprocessor_config.json) into the folder"
            )
        if tuple((int(h), int(w)) for h, w in pins) != spec.image_grid_pinpoints:
            raise ModelLoadError(
                f"{folder}: the image processor tiles at {[list(p) for p in pins]} but config.json says "
                f"{[list(p) for p in spec.image_grid_pinpoints or ()]}; make the two image_grid_pinpoints lists equal"
            )

    # -- prompt ----------------------------------------------------------------------------------------
    def tokenize(self, image: Any, question: str) -> PromptTokens:
        image = image.convert("RGB")
        inputs = self.processor(images=image, text=self.prompt_text(question), return_tensors="pt")
        ids = inputs["input_ids"][0]
        where = (ids == self.image_token_id).nonzero().flatten()
        expected = self.spec.visual_tokens_for(image.height, image.width)
        if len(where) != expected:
            raise ModelLoadError(
                f"the processor expanded <image> into {len(where)} tokens for a {image.width}x{image.height} image, "
                f"but the model's tiling gives {expected}; check image_grid_pinpoints, patch_size and "
                "vision_feature_select_strategy in the processor files against config.json"
            )
        start, end = int(where[0]), int(where[-1]) + 1
        return PromptTokens(ids, start, end, inputs["pixel_values"].to(self.device, self.dtype),
                            inputs["image_sizes"].to(self.device))  # fmt: skip

    # -- compute ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def vision_tiles(self, pixel_values: torch.Tensor) -> VisionOutput:
        """Per tower input (base images and tiles, ``[N, 3, H, W]``): projected patch features ``[N, P, d]``
        and each input's own [CLS] attention ``[N, P]``, not yet packed (what the vision graph computes)."""
        inner = self.model.model
        out = inner.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=True)
        hidden = out.hidden_states[self._feature_layer][:, 1:]  # "default": the patches, not [CLS]
        cls_row = out.attentions[self._feature_layer][:, :, 0, 1:].float().mean(dim=1)
        return VisionOutput(features=inner.multi_modal_projector(hidden), cls_attention=cls_row)

    @property
    def image_newline(self) -> torch.Tensor:
        """The learned token that ends every row of the tile grid ``[d]``."""
        return self.model.model.image_newline

    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisionOutput:
        """Features ``[batch, visual, hidden]`` and [CLS] scores ``[batch, visual]`` of images of one size
        (a batch of one image in the executor; the visual count is the image's)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT's vision needs image_sizes (the original height and width of each image)")
        inner = self.model.model
        tiles = [self.spec.tiles_for(int(h), int(w)) for h, w in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, tiles, strict=True)], dim=0)
        per_tile = self.vision_tiles(pixel_values)
        features, cls_row = per_tile.features, per_tile.cls_attention
        packed, _ = inner.pack_image_features(list(torch.split(features, tiles)), image_sizes, "default",
                                              image_newline=inner.image_newline)  # fmt: skip
        scores, _ = inner.pack_image_features([s[..., None] for s in torch.split(cls_row, tiles)], image_sizes,
                                              "default", image_newline=torch.zeros(1, device=cls_row.device))  # fmt: skip
        if len({p.shape[0] for p in packed}) != 1:
            raise ValueError("a batch of LLaVA-NeXT images must share one visual token count (one image size)")
        return VisionOutput(features=torch.stack(packed), cls_attention=torch.stack([s[:, 0] for s in scores]))


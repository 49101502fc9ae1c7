"""Prompt and answer-text rules shared by the model adapter, a build's runtime and the Triton server model.

A build directory carries the tokenizer and image processor (with its chat template); the runtime formats
prompts with the same rule as the adapter the graphs were checked with, so both see the same token ids.

This module imports nothing but the standard library: ``prune-export deploy`` copies it next to the
Triton orchestrator model (``NAME/1/prune_export_prompt.py``), which runs in Triton's Python backend where
prune-export is not installed, so a served answer is formatted and detokenised by the same code as
``prune-export run``.
"""

from __future__ import annotations

from typing import Any

#: The LLaVA-1.5 conversation format, used when the processor has no chat template.
DEFAULT_PROMPT = "USER: <image>\n{question} ASSISTANT:"
#: The largest image (width x height) a build's runtime and its served model decode: an image is read only
#: after its header says it is no larger (a small PNG can declare hundreds of megapixels). LLaVA resizes
#: every image to a few hundred pixels a side, so 50 megapixels (e.g. 8660 x 5773) leaves every photo in.
MAX_IMAGE_PIXELS = 50_000_000


class PromptError(ValueError):
    """A prompt or image the graphs cannot take; the message says what was wrong and what to do."""


def check_question(question: object) -> str:
    """``question`` if it is non-empty text that encodes as UTF-8 (a command line that received other bytes
    holds them as lone surrogates), else a :class:`PromptError`."""
    if not isinstance(question, str) or not question.strip():
        raise PromptError("the question is empty; pass the text to ask about the image")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = question[exc.start]
        raw = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character U+{ord(bad):04X}"
        raise PromptError(f"the question is not UTF-8 text ({raw} at position {exc.start}); pass it in UTF-8") from None
    return question


def check_image_pixels(width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """A :class:`PromptError` for an image larger than ``max_pixels`` (checked on its header, before decoding)."""
    if width * height > max_pixels:
        raise PromptError(
            f"the image is {width} x {height} = {width * height:,} pixels, more than the limit of {max_pixels:,}; "
            "send a smaller image (the model sees it resized to a few hundred pixels a side) or raise the limit "
            "(prune-export run --max-image-pixels, deploy --max-image-pixels)"
        )


def decode_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """An RGB PIL image from ``source`` (a path or a binary file object), decoded only after its header says
    it has at most ``max_pixels`` pixels; else, or when Pillow cannot read it, a :class:`PromptError`."""
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the cap below is checked on the header instead, with its own message
    try:
        with Image.open(source) as img:
            check_image_pixels(img.width, img.height, max_pixels)
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise PromptError("not an image file Pillow can read; send a PNG, JPEG or another common format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, PromptError):
            raise
        raise PromptError(f"not a readable image ({exc}); send a PNG, JPEG or another common format") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def image_span(ids: Any, image_token_id: int, visual_tokens: int, max_sys_tokens: int, max_text_tokens: int) -> tuple[int, int]:
    """``(start, end)`` of the image tokens in prompt ``ids`` when the graphs can take the prompt: exactly
    ``visual_tokens`` image tokens, at least one token before and after them, and no more system or text
    tokens than the build's bounds; else a :class:`PromptError`."""
    where = [i for i, token in enumerate(ids) if int(token) == int(image_token_id)]
    if len(where) != visual_tokens:
        raise PromptError(f"the prompt holds {len(where)} image tokens, the graphs take {visual_tokens}: the question "
                          "must not contain the image placeholder, and the processor must be the build's own")
    start, end = where[0], where[-1] + 1
    if start == 0 or end == len(ids):
        raise PromptError("the chat template puts the image at the very start or end of the prompt; the graphs take "
                          "the prompt as system tokens + image + text, each non-empty")
    if start > max_sys_tokens:
        raise PromptError(f"the prompt has {start} tokens before the image, more than the build's bound of "
                          f"{max_sys_tokens} (build --max-sys-tokens)")
    if len(ids) - end > max_text_tokens:
        raise PromptError(f"the question makes {len(ids) - end} prompt tokens after the image, more than the build's "
                          f"bound of {max_text_tokens} (build --max-text-tokens); ask a shorter question")
    return start, end


def check_autoprune_image(width: int, height: int, visual: int, n0: int | None) -> None:
    """A :class:`PromptError` when an any-resolution image gives fewer visual tokens than an AutoPrune build's
    ``n0``: the graph holds the schedule table of images with at least N0 = 2.5 T visual tokens; a smaller
    image needs its own table (the executor solves it), which the graph does not have."""
    if n0 is not None and visual < int(n0):
        raise PromptError(
            f"this {width}x{height} image gives {visual} visual tokens, fewer than the AutoPrune build's N0 = {n0} "
            f"(2.5 x T); the build's schedule table is for images of at least {n0} tokens. Use a larger or less "
            "elongated image, or a build with a smaller T"
        )


def prompt_text(processor_or_tokenizer: Any, question: str) -> str:
    """The full prompt for one image and ``question``, ending where the answer starts."""
    template = getattr(processor_or_tokenizer, "chat_template", None)
    if template:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor_or_tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    return DEFAULT_PROMPT.format(question=question)


class TextPieces:
    """Turn greedy token ids into text pieces as they come; the pieces join to the whole answer's text.

    ``add(token)`` returns the new text (possibly ``""``); ``finish()`` returns what is still held back.
    A piece is held back while the decoded text ends in an incomplete character (a byte-level token in
    the middle of a UTF-8 sequence decodes to U+FFFD) or rewrites earlier text (a tokenizer that merges
    across tokens), so a client never receives text it must take back.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece

    def finish(self) -> str:
        text = self.text()
        if text.startswith(self.shown) and len(text) > len(self.shown):
            piece, self.shown = text[len(self.shown) :], text
            return piece
        return ""

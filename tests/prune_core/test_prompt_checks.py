"""The prompt and image checks a build's runtime and its served model share (prune_core.prompt)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from prune_core.prompt import MAX_IMAGE_PIXELS, PromptError, check_question, decode_image, image_span


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, format="PNG")
    return out.getvalue()


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    """A PNG of a few KB that declares 200 megapixels: refused before decoding, with its size and the limit."""
    bomb = _png(20000, 10000, mode="1")
    assert len(bomb) < 100_000
    with pytest.raises(PromptError, match=r"20000 x 10000 = 200,000,000 pixels, more than the limit of 50,000,000"):
        decode_image(io.BytesIO(bomb))
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is put back


def test_the_limit_is_configurable_and_images_under_it_decode() -> None:
    small = _png(120, 90)
    assert decode_image(io.BytesIO(small)).size == (120, 90)
    with pytest.raises(PromptError, match="more than the limit of 10,000"):
        decode_image(io.BytesIO(small), max_pixels=10_000)
    assert decode_image(io.BytesIO(small), max_pixels=120 * 90).mode == "RGB"  # the limit itself is allowed
    assert MAX_IMAGE_PIXELS == 50_000_000


def test_bytes_that_are_not_an_image_are_refused() -> None:
    with pytest.raises(PromptError, match="not an image file Pillow can read"):
        decode_image(io.BytesIO(b"not an image at all"))


@pytest.mark.parametrize(("question", "needle"), [
    ("   ", "question is empty"),
    ("caf\udce9?", "not UTF-8 text (byte 0xe9 at position 3)"),  # a command line's undecodable byte
    ("\ud800 lone", "not UTF-8 text (character U+D800 at position 0)"),
])  # fmt: skip
def test_questions_that_are_not_text_are_refused(question: str, needle: str) -> None:
    with pytest.raises(PromptError) as err:
        check_question(question)
    assert needle in str(err.value)


def test_a_real_question_passes() -> None:
    assert check_question("What colour is the café's door?") == "What colour is the café's door?"


IMG = 9


@pytest.mark.parametrize(("ids", "needle"), [
    ([1, 2, IMG, IMG, 3], "holds 2 image tokens, the graphs take 3"),
    ([IMG, IMG, IMG, 3], "very start or end"),
    ([1, IMG, IMG, IMG], "very start or end"),
    ([1, 1, 1, 1, IMG, IMG, IMG, 3], "4 tokens before the image, more than the build's bound of 3"),
    ([1, IMG, IMG, IMG, 3, 3, 3, 3, 3, 3], "6 prompt tokens after the image, more than the build's bound of 5"),
])  # fmt: skip
def test_prompts_the_graphs_cannot_take_are_refused(ids: list[int], needle: str) -> None:
    with pytest.raises(PromptError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        image_span(ids, IMG, visual_tokens=3, max_sys_tokens=3, max_text_tokens=5)


def test_a_prompt_within_the_bounds_gives_the_image_span() -> None:
    assert image_span([1, 1, 1, IMG, IMG, IMG, 3, 3, 3, 3, 3], IMG, 3, 3, 5) == (3, 6)

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

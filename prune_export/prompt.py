"""The LLaVA prompt for one image and a question: shared by the model adapter and a build's runtime.

A build directory carries the tokenizer and image processor (with its chat template); the runtime formats
prompts with the same rule as the adapter the graphs were checked with, so both see the same token ids.
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

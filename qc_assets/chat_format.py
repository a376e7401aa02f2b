"""The student's conversation format, shared by training and generation so both see the same tokens.

A student is trained and asked in seed 000's SFT format: a system turn holding the category name, a user turn
holding the document, the query as the assistant's answer. The prompt is the checkpoint's own chat template with
`add_generation_prompt=True` and thinking switched off where the template has the switch (Qwen3's puts an empty
think block before the answer); templates without the variable ignore it. This module imports nothing heavy, so
the Pipes training script and every generation backend can use it.
"""

from __future__ import annotations

from typing import Any

# Passed to apply_chat_template wherever a student's prompt is rendered.
GENERATION_TEMPLATE_KWARGS: dict[str, Any] = {"enable_thinking": False}


def messages_for(category: str, text: str) -> list[dict[str, str]]:
    """The SFT conversation without its answer: system = category, user = document."""
    return [{"role": "system", "content": category}, {"role": "user", "content": text}]


def render_prompt(tokenizer, category: str, text: str) -> str:
    """The generation prompt: what the trainer puts before the answer and what every generator sends."""
    return tokenizer.apply_chat_template(
        messages_for(category, text), add_generation_prompt=True, tokenize=False, **GENERATION_TEMPLATE_KWARGS
    )


def encode_rendered(tokenizer, rendered: str) -> list[int]:
    """Token ids of text a chat template rendered: the template already wrote any BOS or special tokens, so the
    tokenizer must not add them again."""
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])

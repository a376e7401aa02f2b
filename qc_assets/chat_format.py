"""The student's conversation format, shared by training and generation so both see the same tokens.

A student is trained and asked in seed 000's SFT format: a system turn holding the category name, a user turn
holding the document, the query as the assistant's answer. The prompt is the checkpoint's own chat template with
`add_generation_prompt=True` and thinking switched off where the template has the switch (Qwen3's puts an empty
think block before the answer); templates without the variable ignore it. Training builds each example from the
same prompt token ids (`training_example`), so any chat template trains, with or without `{% generation %}` marks.
This module imports nothing heavy, so the Pipes training script and every generation backend can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainingExample:
    """One SFT row as token ids: the prompt exactly as a generator sends it, then what the model must write."""

    prompt_ids: list[int]
    completion_ids: list[int]
    # "template": what the template renders after the prompt for the assistant turn; "answer+eos": the template's
    # full rendering does not start with its generation prompt, so the answer and the eos token are used instead.
    completion_source: str
    end_of_turn: str  # the token that ends the completion: the one the generator has to learn to stop with


def render_conversation(tokenizer, category: str, text: str, answer: str) -> str:
    """The whole SFT conversation, answer included, rendered with the same template kwargs as the prompt."""
    messages = [*messages_for(category, text), {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, tokenize=False, **GENERATION_TEMPLATE_KWARGS)


def training_example(tokenizer, category: str, text: str, answer: str) -> TrainingExample:
    """Prompt and completion token ids for one row, whatever the chat template (no generation marks needed).

    The prompt is tokenized on its own, as every generator does, so the model is trained on exactly the context it
    is later asked in. The completion is the rest of the template's full rendering; what the template writes after
    the end-of-turn token (a newline before the next turn) is never generated, so it is left out.
    """
    prompt = render_prompt(tokenizer, category, text)
    full = render_conversation(tokenizer, category, text, answer)
    if full.startswith(prompt):
        completion_ids = _without_tail_after_end_of_turn(tokenizer, encode_rendered(tokenizer, full[len(prompt) :]))
        source = "template"
    else:
        completion_ids = encode_rendered(tokenizer, answer)
        source = "answer+eos"
    special = special_token_ids(tokenizer)
    if not completion_ids or completion_ids[-1] not in special:
        completion_ids = [*completion_ids, _eos_id(tokenizer)]
    return TrainingExample(
        prompt_ids=encode_rendered(tokenizer, prompt),
        completion_ids=completion_ids,
        completion_source=source,
        end_of_turn=tokenizer.convert_ids_to_tokens(completion_ids[-1]),
    )


def special_token_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens, with added tokens marked special that it does not list (Llama 3's
    `<|eot_id|>` where eos is `<|end_of_text|>`)."""
    added = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def _without_tail_after_end_of_turn(tokenizer, ids: list[int]) -> list[int]:
    special = special_token_ids(tokenizer)
    last = max((position for position, token_id in enumerate(ids) if token_id in special), default=None)
    if last is None or tokenizer.decode(ids[last + 1 :]).strip():
        return ids
    return ids[: last + 1]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the chat template ends the answer with no special token and the tokenizer has no eos token: the model "
            "could not learn to stop"
        )
    return int(tokenizer.eos_token_id)

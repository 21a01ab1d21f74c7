"""Prompt styles: how a conversation becomes the text a model is trained on and prompted with.

Three styles (LLMs-from-scratch ch07 plus the model's own template):

- "chat": the tokenizer's chat template (the default; what the engines use for `chat`).
- "alpaca": "Below is an instruction that describes a task. …### Instruction:…### Response:".
- "phi3": "<|user|>\\n{instruction}\\n<|assistant|>\\n".

`render_prompt` gives the text before the final assistant response (what generation starts
from); `render_segments` gives the whole example as (text, is_assistant) pieces so training
can mask every non-assistant token. Training and generation share these two functions, so a
model is always prompted exactly as it was trained.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

from exnihilo.errors import ExnihiloError
from exnihilo.templates import render

STYLES = ("chat", "alpaca", "phi3")

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")

Segment = tuple[str, bool]


def _valid_style(value: str) -> str:
    if value not in STYLES:
        raise ValueError(f"unknown style {value!r} (known: {', '.join(STYLES)})")
    return value


# A config field holding a prompt style, validated where the config is built.
StyleName = Annotated[str, AfterValidator(_valid_style)]


def check_style(style: str) -> None:
    if style not in STYLES:
        raise ExnihiloError(f"unknown prompt style {style!r} (known: {', '.join(STYLES)})")


def _split_final_answer(messages: list[dict[str, str]]
                        ) -> tuple[list[dict[str, str]], dict[str, str] | None]:
    """(messages before the final assistant message, that message or None)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]
    return messages, None


def _single_turn(messages: list[dict[str, str]], style: str) -> tuple[str, str]:
    """(instruction, input) for the single-turn styles; they have no place for a system
    message or earlier turns, so those are errors rather than silently dropped text."""
    roles = [m["role"] for m in messages]
    if roles != ["user"]:
        raise ExnihiloError(
            f"style {style!r} takes one user message (and its answer); got roles "
            f"{roles}: use --style chat for system prompts or multi-turn conversations")
    return messages[0]["content"], ""


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt exactly as in ch07 (`format_input` + the response header)."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    return text + "\n\n### Response:\n"


def phi3_prompt(instruction: str, input_text: str = "") -> str:
    """The Phi-3 prompt of ch07's exercise 7.1 (input, when present, on its own line)."""
    text = f"<|user|>\n{instruction}"
    if input_text:
        text += f"\n{input_text}"
    return text + "\n<|assistant|>\n"


def _alpaca_fields(messages: list[dict[str, str]], style: str,
                   alpaca_meta: dict[str, str] | None) -> tuple[str, str]:
    instruction, input_text = _single_turn(messages, style)
    if alpaca_meta:
        # A record converted from Alpaca keeps its original fields: use them so the
        # "### Input:" section reappears as in the source data.
        inst, inp = alpaca_meta.get("instruction", ""), alpaca_meta.get("input", "")
        joined = inst if not inp else f"{inst}\n\n{inp}"
        if joined == instruction:
            return inst, inp
    return instruction, input_text


def render_prompt(messages: list[dict[str, str]], style: str, tokenizer: Any,
                  alpaca_meta: dict[str, str] | None = None) -> str:
    """The text a model sees before the final assistant response.

    A trailing assistant message (the reference answer) is ignored. `alpaca_meta` is a
    record's meta["alpaca"] ({instruction, input}) when it came from Alpaca data.
    """
    check_style(style)
    before, _ = _split_final_answer(messages)
    if not before:
        raise ExnihiloError("conversation has no message before the answer")
    if style == "chat":
        return render(tokenizer, before, add_generation_prompt=True)
    instruction, input_text = _alpaca_fields(before, style, alpaca_meta)
    if style == "alpaca":
        return alpaca_prompt(instruction, input_text)
    return phi3_prompt(instruction, input_text)


def _move_trailing_space(text: str) -> tuple[str, str]:
    """Split 'answer<|im_end|>\\n' into ('answer<|im_end|>', '\\n')."""
    stripped = text.rstrip()
    return stripped, text[len(stripped):]


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[Segment]:
    """Segments of a chat-templated conversation, found by rendering growing prefixes.

    For each assistant turn i, render(messages[:i], generation prompt) must be a prefix of
    render(messages[:i+1]); the difference is the assistant's text including its end-of-turn
    marker (trained: the model must learn to end its turn). Whitespace after that marker is
    not trained, and the final one is dropped (generation stops at the marker).
    """
    segments: list[Segment] = []
    done = ""  # text already emitted as segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ExnihiloError("conversation starts with an assistant message; it needs a "
                                "user message first")
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ExnihiloError(
                "the chat template does not render conversations prefix by prefix (it "
                "rewrites earlier turns), so assistant tokens cannot be located for masking; "
                "use --style alpaca/phi3 or a single-turn dataset")
        answer, trailing = _move_trailing_space(full[len(prompt):])
        if prompt[len(done):]:
            segments.append((prompt[len(done):], False))
        segments.append((answer, True))
        done = prompt + answer
        if i < len(messages) - 1 and trailing:
            segments.append((trailing, False))
            done += trailing
    return merge_segments(segments)


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring segments that share a flag (fewer, longer pieces to tokenise)."""
    merged: list[Segment] = []
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def render_segments(messages: list[dict[str, str]], style: str, tokenizer: Any,
                    alpaca_meta: dict[str, str] | None = None) -> list[Segment]:
    """The whole example as (text, is_assistant) segments, in order.

    Concatenated, the segments are the training text (without the EOS that the collate
    appends). Every assistant message is a trained segment; everything else (system, user,
    template markup) is not.
    """
    check_style(style)
    if not any(m["role"] == "assistant" for m in messages):
        raise ExnihiloError("conversation has no assistant message to train on")
    if style == "chat":
        if messages[-1]["role"] != "assistant":
            messages = messages[:_last_assistant_index(messages) + 1]
        return _chat_segments(messages, tokenizer)
    before, answer = _split_final_answer(messages)
    if answer is None:
        raise ExnihiloError(f"style {style!r} needs the conversation to end with the "
                            f"assistant's answer")
    prompt = render_prompt(before, style, tokenizer, alpaca_meta)
    return [(prompt, False), (answer["content"], True)]


def _last_assistant_index(messages: list[dict[str, str]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")



# Jinja chat templates that reproduce the single-turn styles, baked into a model trained on
# them (`train.run.save_final_model`) so that vLLM, Ollama, llama.cpp and
# `lm-eval --apply_chat_template` prompt it the way it was trained. A user message renders
# as `render_prompt` does; an assistant message is its text plus EOS.
_STYLE_TEMPLATES = {
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        + ALPACA_PREAMBLE.replace("'", "\\'")
        + "\n\n### Instruction:\n{{ message['content'] }}\n\n### Response:\n"
        "{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}"),
    "phi3": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "<|user|>\n{{ message['content'] }}\n<|assistant|>\n"
        "{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}"),
}


def style_chat_template(style: str) -> str | None:
    """The chat template equivalent to a single-turn style (None for "chat": the model's
    own template is already right)."""
    check_style(style)
    return _STYLE_TEMPLATES.get(style)

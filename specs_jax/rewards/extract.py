"""Locating the judged answer in a response: the answer block and the last ``\\boxed{}``."""

from __future__ import annotations

from specs_jax.rewards.format import ANSWER_CLOSE, ANSWER_OPEN
from specs_jax.rewards.limits import MAX_ANSWER_CHARS, MAX_RESPONSE_CHARS

BOXED = "\\boxed{"


def answer_region(text: str) -> str:
    """The part of ``text`` where the answer is looked for.

    Rule: the text between the last ``<answer>`` and the first ``</answer>`` after it when both
    exist; otherwise (no answer block, e.g. a corrupted or base-model response) the whole text.
    """
    start = text.rfind(ANSWER_OPEN)
    if start < 0:
        return text
    end = text.find(ANSWER_CLOSE, start)
    return text if end < 0 else text[start + len(ANSWER_OPEN) : end]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text``, nested braces included.

    Returns None when there is no ``\\boxed{``, when the last one is unbalanced, or when its
    content exceeds :data:`~specs_jax.rewards.limits.MAX_ANSWER_CHARS` (the scan stops there,
    so the cost is bounded whatever the nesting).
    """
    start = text.rfind(BOXED)
    if start < 0:
        return None
    begin = start + len(BOXED)
    depth = 1
    stop = min(len(text), begin + MAX_ANSWER_CHARS + 1)
    for i in range(begin, stop):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def extract_answer(text: str) -> str | None:
    """The judged answer: the last ``\\boxed{}`` content inside :func:`answer_region`.

    None for texts over :data:`~specs_jax.rewards.limits.MAX_RESPONSE_CHARS` or with no
    usable ``\\boxed{}``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if len(text) > MAX_RESPONSE_CHARS:
        return None
    return last_boxed(answer_region(text))

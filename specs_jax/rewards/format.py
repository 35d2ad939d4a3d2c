"""The SPECS / MM-EUREKA format reward."""

from __future__ import annotations

from specs_jax.rewards.limits import MAX_RESPONSE_CHARS

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
FORMAT_REWARD = 0.5


def has_format(text: str) -> bool:
    """True when ``text`` is ``<think>(.+?)</think>\\s*<answer>(.+?)</answer>`` and nothing else.

    Rule (MM-EUREKA's check): each of the four tags occurs exactly once, in that order; the
    think and answer bodies are non-empty; only whitespace may stand between ``</think>`` and
    ``<answer>``, before ``<think>`` and after ``</answer>``. Texts longer than
    :data:`~specs_jax.rewards.limits.MAX_RESPONSE_CHARS` fail.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if len(text) > MAX_RESPONSE_CHARS or any(text.count(tag) != 1 for tag in TAGS):
        return False
    body = text.strip()
    if not (body.startswith(THINK_OPEN) and body.endswith(ANSWER_CLOSE)):
        return False
    think_end = body.find(THINK_CLOSE)
    answer_start = body.find(ANSWER_OPEN)
    gap = body[think_end + len(THINK_CLOSE) : answer_start]
    return (
        think_end > len(THINK_OPEN)
        and answer_start > think_end
        and (gap == "" or gap.isspace())
        and len(body) - len(ANSWER_CLOSE) > answer_start + len(ANSWER_OPEN)
    )


def format_reward(text: str) -> float:
    """0.5 when :func:`has_format` holds, else 0.0."""
    return FORMAT_REWARD if has_format(text) else 0.0

"""Format corruptions that turn a correctly formatted response into a rejected one (SPECS stage 1).

Each corruption keeps every character of the response except tags, so the final
``\\boxed{}`` answer survives and the corrupted text keeps its accuracy reward
(:func:`~specs_jax.rewards.extract.answer_region` falls back to the whole text once the
answer block is gone), while :func:`~specs_jax.rewards.format.has_format` fails.
"""

from __future__ import annotations

from collections.abc import Mapping

from specs_jax.rewards.format import ANSWER_CLOSE, ANSWER_OPEN, TAGS, THINK_CLOSE, THINK_OPEN, has_format

CORRUPTION_KINDS = ("strip_all_tags", "strip_think", "strip_answer", "think_to_end", "tags_to_text")
DEFAULT_TAG_TEXT: Mapping[str, str] = {ANSWER_OPEN: "Answer: ", ANSWER_CLOSE: ""}


def _remove(text: str, tags: tuple[str, ...]) -> str:
    for tag in tags:
        text = text.replace(tag, "")
    return text


def validate_tag_text(tag_text: Mapping[str, str]) -> None:
    """Raise ValueError unless ``tag_text`` maps format tags to tag-free replacement texts."""
    if not tag_text:
        raise ValueError("tag_text is empty: tags_to_text needs at least one tag to replace")
    for tag, replacement in tag_text.items():
        if tag not in TAGS:
            raise ValueError(f"tag_text key {tag!r} is not one of the format tags {TAGS}")
        if any(t in replacement for t in TAGS):
            raise ValueError(f"tag_text replacement {replacement!r} for {tag!r} contains a tag")


def corrupt(text: str, kind: str, tag_text: Mapping[str, str] = DEFAULT_TAG_TEXT) -> str:
    """Apply the corruption ``kind`` to a correctly formatted response.

    Kinds (METHOD.md section 2):

    - ``strip_all_tags``: delete all four tags.
    - ``strip_think``: delete ``<think>`` and ``</think>``.
    - ``strip_answer``: delete ``<answer>`` and ``</answer>``.
    - ``think_to_end``: delete the answer tags and ``</think>``, then append ``</think>`` to
      the right-stripped text, so the whole response sits inside the think block.
    - ``tags_to_text``: replace each tag in ``tag_text`` by its plain text (default:
      ``<answer>`` -> ``"Answer: "``, ``</answer>`` deleted).

    Raises ValueError when ``text`` is not correctly formatted (the result would not be a
    format-only corruption), when ``kind`` is unknown, or when ``tag_text`` is unusable.
    """
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"unknown corruption kind {kind!r}; expected one of {CORRUPTION_KINDS}")
    if not has_format(text):
        raise ValueError(
            "corrupt() needs a correctly formatted <think>...</think><answer>...</answer> response"
        )
    if kind == "strip_all_tags":
        return _remove(text, TAGS)
    if kind == "strip_think":
        return _remove(text, (THINK_OPEN, THINK_CLOSE))
    if kind == "strip_answer":
        return _remove(text, (ANSWER_OPEN, ANSWER_CLOSE))
    if kind == "think_to_end":
        return _remove(text, (THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)).rstrip() + THINK_CLOSE
    validate_tag_text(tag_text)
    for tag, replacement in tag_text.items():
        text = text.replace(tag, replacement)
    return text

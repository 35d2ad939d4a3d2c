"""Format corruptions: every kind breaks the format and keeps the boxed answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specs_jax.rewards import (
    CORRUPTION_KINDS,
    accuracy_reward,
    corrupt,
    extract_answer,
    format_reward,
    has_format,
)

BODY = st.text(
    alphabet=st.characters(blacklist_characters="<{}\\", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=200,
)
ANSWERS = st.sampled_from(["12", "\\frac{1}{2}", "-3.5", "(B)", "30^\\circ", "{a}_{1}", "x = 5"])
GAPS = st.sampled_from(["", " ", "\n", "\n\n", " \t\n"])


@settings(max_examples=150, deadline=None)
@given(think=BODY, prefix=BODY, answer=ANSWERS, gap=GAPS, lead=GAPS, kind=st.sampled_from(CORRUPTION_KINDS))
def test_corruption_breaks_format_and_keeps_answer(
    think: str, prefix: str, answer: str, gap: str, lead: str, kind: str
) -> None:
    text = f"{lead}<think>{think}</think>{gap}<answer>{prefix} \\boxed{{{answer}}}</answer>{lead}"
    assert has_format(text)
    corrupted = corrupt(text, kind)
    assert format_reward(corrupted) == 0.0
    assert extract_answer(corrupted) == answer
    assert accuracy_reward(corrupted, answer) == accuracy_reward(text, answer) == 1.0


RESPONSE = "<think>AB = 10, so BC = 12.</think>\n<answer>The answer is \\boxed{12}</answer>"


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("strip_all_tags", "AB = 10, so BC = 12.\nThe answer is \\boxed{12}"),
        ("strip_think", "AB = 10, so BC = 12.\n<answer>The answer is \\boxed{12}</answer>"),
        ("strip_answer", "<think>AB = 10, so BC = 12.</think>\nThe answer is \\boxed{12}"),
        ("think_to_end", "<think>AB = 10, so BC = 12.\nThe answer is \\boxed{12}</think>"),
        ("tags_to_text", "<think>AB = 10, so BC = 12.</think>\nAnswer: The answer is \\boxed{12}"),
    ],
)
def test_each_kind_on_a_fixed_response(kind: str, expected: str) -> None:
    assert corrupt(RESPONSE, kind) == expected


def test_tags_to_text_replacements_are_configurable() -> None:
    out = corrupt(RESPONSE, "tags_to_text", {"<think>": "Thinking: ", "</think>": "", "<answer>": "Final: "})
    assert out == "Thinking: AB = 10, so BC = 12.\nFinal: The answer is \\boxed{12}</answer>"
    assert format_reward(out) == 0.0


@pytest.mark.parametrize(
    "text,kind,tag_text,message",
    [
        (RESPONSE, "shuffle", None, "unknown corruption kind"),
        ("no tags \\boxed{1}", "strip_think", None, "correctly formatted"),
        (RESPONSE, "tags_to_text", {}, "tag_text is empty"),
        (RESPONSE, "tags_to_text", {"<answer": "A:"}, "not one of the format tags"),
        (RESPONSE, "tags_to_text", {"<answer>": "<answer>"}, "contains a tag"),
    ],
)
def test_corrupt_rejects_bad_input(text: str, kind: str, tag_text: dict | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corrupt(text, kind) if tag_text is None else corrupt(text, kind, tag_text)

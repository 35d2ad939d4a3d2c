"""Table-driven tests of the SPECS reward: format, answer extraction and equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from specs_jax.rewards import (
    accuracy_reward,
    answers_equal,
    extract_answer,
    format_reward,
    score_batch,
    specs_reward,
)


def fmt(answer: str, think: str = "Reasoning about the figure.") -> str:
    """A correctly formatted response whose answer block ends with ``\\boxed{answer}``."""
    return f"<think>{think}</think>\n<answer>The answer is \\boxed{{{answer}}}.</answer>"


FORMAT_CASES = [
    ("<think>r</think><answer>a</answer>", True),
    ("<think>r</think>\n\n  <answer>a</answer>", True),
    ("  \n<think>multi\nline</think> <answer>a\nb</answer>\n ", True),
    ("<think> </think><answer> </answer>", True),
    ("<think></think><answer>a</answer>", False),
    ("<think>r</think><answer></answer>", False),
    ("<think>r</think>text<answer>a</answer>", False),
    ("preamble <think>r</think><answer>a</answer>", False),
    ("<think>r</think><answer>a</answer> trailing", False),
    ("<answer>a</answer><think>r</think>", False),
    ("<think>r</think><think>r</think><answer>a</answer>", False),
    ("<think>r<answer>x</answer></think><answer>a</answer>", False),
    ("<think>r</think><answer>a</answer></answer>", False),
    ("<think>r</think>", False),
    ("r \\boxed{1}", False),
    ("<think>r<answer>a</answer>", False),
    ("<think>r</answer><answer>a</think>", False),
]


@pytest.mark.parametrize("text,ok", FORMAT_CASES)
def test_format_reward(text: str, ok: bool) -> None:
    assert format_reward(text) == (0.5 if ok else 0.0)


EQUAL_CASES = [
    ("12", "12", True),
    ("12", "13", False),
    ("2", "3", False),
    ("0.5", "1/2", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac{3}{4}", "3/4", True),
    ("\\frac12", "0.5", True),
    ("\\frac{6}{4}", "\\frac{3}{2}", True),
    ("\\frac{1}{3}", "0.33", False),
    ("1.50", "1.5", True),
    ("012", "12", True),
    (".5", "0.5", True),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("\u22123", "-3", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("-0.5", "0.5", False),
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("50%", "50\\%", True),
    ("50\\%", "5", False),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30°", True),
    ("45^\\circ", "30", False),
    ("12\\text{ cm}", "12", True),
    ("12 \\mathrm{cm}^2", "12", True),
    ("12 cm", "12", True),
    ("13 cm", "12", False),
    ("\\text{12}", "12", True),
    ("$12$", "12", True),
    ("\\left(3\\right)", "3", True),
    ("1,000", "1000", True),
    ("2^{10}", "1024", True),
    ("3 \\times 10^{2}", "300", True),
    ("2 \\cdot 3", "6", True),
    ("\\sqrt{16}", "4", True),
    ("x = 5", "5", True),
    ("y=\\frac{1}{2}", "0.5", True),
    ("(B)", "B", True),
    ("B.", "B", True),
    ("B", "(B)", True),
    ("\\text{(C)}", "C", True),
    ("B. 12 cm", "B", True),
    ("B", "C", False),
    ("(A)", "12", False),
    ("Yes", "yes", True),
    ("no", "yes", False),
    ("triangle ABC", "Triangle  ABC", True),
    ("2\\sqrt{3}", "2\\sqrt3", True),
    ("2\\sqrt{3}", "2\\sqrt{2}", False),
    ("(1, 2)", "(1,2)", True),
    ("(1, 2)", "(2,1)", False),
    ("[1, 2)", "(1, 2)", False),
    ("\\frac{1}{2}, 3", "0.5,3", True),
    ("\\boxed{7}", "7", True),
    ("7", "\\boxed{7}", True),
    ("2\\pi", "2 \\pi", True),
    ("2\\pi", "\\pi", False),
    ("", "", False),
]


@pytest.mark.parametrize("answer,truth,equal", EQUAL_CASES)
def test_answers_equal(answer: str, truth: str, equal: bool) -> None:
    assert answers_equal(answer, truth) is equal
    assert accuracy_reward(fmt(answer), truth) == (1.0 if equal else 0.0)


EXTRACT_CASES = [
    (fmt("\\frac{1}{2}"), "\\frac{1}{2}"),
    (fmt("{a}_{b}"), "{a}_{b}"),
    ("<think>\\boxed{1}</think><answer>\\boxed{2} then \\boxed{3}</answer>", "3"),
    ("<think>\\boxed{1}</think><answer>no box here</answer>", None),
    ("plain reasoning, so \\boxed{4}. Later \\boxed{5}", "5"),
    ("<think>r</think>Answer: \\boxed{6}", "6"),
    ("\\boxed{unbalanced", None),
    ("\\boxed{1} and \\boxed{2", None),
    ("no box at all", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_specs_reward_values() -> None:
    assert specs_reward(fmt("12"), "12") == 1.5
    assert specs_reward(fmt("11"), "12") == 0.5
    assert specs_reward("So the answer is \\boxed{12}.", "12") == 1.0
    assert specs_reward("So the answer is 12.", "12") == 0.0
    assert specs_reward("<think>r</think><answer>12</answer>", "12") == 0.5


def test_score_batch_matches_single_calls() -> None:
    texts = [fmt("12"), fmt("11"), "\\boxed{12}", "nothing", fmt("\\frac{1}{2}")]
    truths = ["12", "12", "12", "12", "0.5"]
    batch = score_batch(texts, truths)
    np.testing.assert_array_equal(batch.format, [0.5, 0.5, 0.0, 0.0, 0.5])
    np.testing.assert_array_equal(batch.accuracy, [1.0, 0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(batch.total, [specs_reward(t, g) for t, g in zip(texts, truths)])
    assert batch.total.dtype == np.float32


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        score_batch(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="ground_truth must be str"):
        accuracy_reward(fmt("1"), 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be str"):
        format_reward(None)  # type: ignore[arg-type]

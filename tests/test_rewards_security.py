"""Hostile model outputs: no code runs, nothing hangs, the reward is 0."""

from __future__ import annotations

import ast
import pathlib
import time

import pytest

import specs_jax.rewards
from specs_jax.rewards import accuracy_reward, answers_equal, score_batch


def _hostile_outputs(marker: pathlib.Path) -> list[str]:
    payload = f"__import__('os').system('touch {marker}')"
    return [
        f"\\boxed{{{payload}}}",
        f"<think>x</think><answer>\\boxed{{{payload}}}</answer>",
        f"<think>x</think><answer>\\boxed{{eval(\"{payload}\")}}</answer>",
        "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
        "\\boxed{" + "{" * 60_000 + "1" + "}" * 60_000 + "}",
        "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",
        "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
        "\\boxed{" + "1" * 1_000_000 + "}",
        "<think>x</think><answer>\\boxed{" + "7" * 999 + "}</answer>",
        "\\boxed{{1}",
        "\\boxed{1" + "{" * 50_000,
        "\\boxed{10^{10^{10}}}",
        "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
        "\\boxed{(10^{100})^{100}}",
        "\\boxed{" + "*".join(["10^{400}"] * 100) + "}",
        "\\boxed{" + "1 a " * 240 + "!}",
        "\\boxed{\\frac{1}{0}}",
        "\\boxed{\\sqrt{-1}}",
        "\\boxed{0^{-1}}",
        "<think>" * 10_000 + "</answer>" * 10_000,
        "\\boxed{" * 20_000,
    ]


def test_hostile_outputs_score_zero_fast_without_side_effects(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned_X"
    for text in _hostile_outputs(marker):
        start = time.perf_counter()
        reward = accuracy_reward(text, "1")
        elapsed = time.perf_counter() - start
        assert reward == 0.0, text[:80]
        assert elapsed < 1.0, (text[:80], elapsed)
    assert not marker.exists()


def test_hostile_batch_is_bounded(tmp_path: pathlib.Path) -> None:
    texts = _hostile_outputs(tmp_path / "pwned_Y")
    start = time.perf_counter()
    batch = score_batch(texts, ["1"] * len(texts))
    assert time.perf_counter() - start < 5.0
    assert batch.accuracy.max() == 0.0
    assert not (tmp_path / "pwned_Y").exists()


@pytest.mark.parametrize(
    "truth",
    ["{" * 100_000 + "1" + "}" * 100_000, "9" * 1_000_000, "10^{10^{10}}"],
    ids=["nested_braces", "megabyte_of_digits", "tower_exponent"],
)
def test_hostile_ground_truth_is_bounded(truth: str) -> None:
    start = time.perf_counter()
    assert not answers_equal("1", truth)
    assert time.perf_counter() - start < 1.0


def test_reward_code_never_evaluates_text() -> None:
    """No eval/exec/compile/__import__ calls and no sympy anywhere in the rewards package."""
    package = pathlib.Path(specs_jax.rewards.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"eval", "exec", "compile", "__import__"}, source.name
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(m.split(".")[0] == "sympy" for m in modules), source.name

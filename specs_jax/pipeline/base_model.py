"""The tiny base model of the embedded default: a Qwen2.5-VL-architecture model that answers the
synthetic questions mostly in plain text, with partial accuracy.

Made as the pipeline's first model stage (nothing is downloaded): a byte-level BPE tokenizer
trained on the synthetic corpus with Qwen's special and chat-template tokens
(:func:`specs_jax.data.tokenizer.build_processor`), a random model of the ``architecture``
overrides over ``models/tiny.json`` sized to that vocabulary, then SFT on the training split.
The SFT target of a row is its reference solution (a short reasoning ending in ``\\boxed{answer}``)
as plain text; a share ``format_fraction`` of the rows instead gets the SPECS format
``<think>reasoning</think> <answer>\\boxed{answer}</answer>``, so that the base policy follows the
format now and then, as an instruction-tuned model does before RL (GRPO-zero and the pairs need
some formatted, correct samples to start from). The row's draw is seeded: the same config gives
the same SFT set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

__all__ = ["BaseModelConfig", "formatted_response", "plain_response", "sft_rows", "split_solution"]


@dataclasses.dataclass
class BaseModelConfig:
    """Options of the base model stage. ``architecture``: HF config fields over ``models/tiny.json``
    (``vision_config`` entries as a nested dict); ``vocab_size``: BPE size before special tokens."""

    architecture: dict = dataclasses.field(default_factory=dict)
    vocab_size: int = 1024
    format_fraction: float = 0.3
    train: dict = dataclasses.field(default_factory=dict)  # run-config overrides of the SFT (train, optim, ...)


def split_solution(solution: str) -> tuple[str, str]:
    """``(reasoning, boxed)`` of a synthetic solution ``"... reasoning. \\boxed{a}"``."""
    at = solution.rfind("\\boxed{")
    if at < 0:
        raise ValueError(f"solution has no \\boxed{{}}: {solution!r}")
    return solution[:at].strip(), solution[at:].strip()


def plain_response(solution: str) -> str:
    """The plain-text answer: the solution as it is (reasoning, then ``\\boxed{a}``), no tags."""
    reasoning, boxed = split_solution(solution)
    return f"{reasoning} {boxed}"


def formatted_response(solution: str) -> str:
    """The SPECS format: ``<think>reasoning</think> <answer>\\boxed{a}</answer>``."""
    reasoning, boxed = split_solution(solution)
    return f"<think>{reasoning}</think> <answer>{boxed}</answer>"


def sft_rows(solutions: Iterable[str], format_fraction: float, seed: int) -> tuple[list[str], np.ndarray]:
    """SFT targets of the base model and which of them are formatted (``[N]`` bool), seeded."""
    solutions = list(solutions)
    if not 0 <= format_fraction <= 1:
        raise ValueError(f"base.format_fraction must be in [0, 1], got {format_fraction}")
    formatted = np.random.default_rng([seed, 7]).random(len(solutions)) < format_fraction
    return [formatted_response(s) if f else plain_response(s) for s, f in zip(solutions, formatted)], formatted

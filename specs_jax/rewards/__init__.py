"""Verifiable rewards and format corruptions of SPECS (METHOD.md sections 2 and 3).

- :func:`format_reward`: 0.5 for ``<think>...</think> <answer>...</answer>`` and nothing else.
- :func:`accuracy_reward`: 1.0 when the last ``\\boxed{}`` of the answer block (of the whole
  text when there is no answer block) equals the ground truth, judged by an exact rational
  parser that never evaluates model text as code.
- :func:`specs_reward` = format + accuracy; :func:`score_batch` for many responses.
- :func:`corrupt`: the five format corruptions used to build rejected responses.
"""

from specs_jax.rewards.corrupt import CORRUPTION_KINDS, DEFAULT_TAG_TEXT, corrupt
from specs_jax.rewards.extract import extract_answer
from specs_jax.rewards.format import TAGS, format_reward, has_format
from specs_jax.rewards.math_equal import answers_equal, canonical_answer
from specs_jax.rewards.reward import RewardBatch, accuracy_reward, score_batch, specs_reward

__all__ = [
    "CORRUPTION_KINDS",
    "DEFAULT_TAG_TEXT",
    "TAGS",
    "RewardBatch",
    "accuracy_reward",
    "answers_equal",
    "canonical_answer",
    "corrupt",
    "extract_answer",
    "format_reward",
    "has_format",
    "score_batch",
    "specs_reward",
]

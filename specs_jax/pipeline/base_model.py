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
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["BaseModelConfig", "build_key", "file_sha256", "formatted_response", "plain_response", "prebuilt_dir",
           "prebuilt_mismatch", "rows_digest", "sft_rows", "split_solution"]

BUILD_FILE = "build.json"  # in a shipped base model directory: the build key, the stage summary and the checksums


@dataclasses.dataclass
class BaseModelConfig:
    """Options of the base model stage. ``architecture``: HF config fields over ``models/tiny.json``
    (``vision_config`` entries as a nested dict); ``vocab_size``: BPE size before special tokens."""

    architecture: dict = dataclasses.field(default_factory=dict)
    vocab_size: int = 1024
    format_fraction: float = 0.3
    train: dict = dataclasses.field(default_factory=dict)  # run-config overrides of the SFT (train, optim, ...)
    # a shipped base model directory (a name under models/, or a path) made by scripts/build_base.py: the stage
    # copies it instead of training when it was built from the same data and settings (its build.json), else trains
    prebuilt: str | None = None
    rebuild: bool = False  # train even when the prebuilt base matches


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


def build_key(base: dict, system_prompt: str, common: dict, data_digest: str, seed: int) -> dict:
    """What a base model is a function of: the base section (without ``prebuilt``/``rebuild``), the system prompt,
    the common run-config overrides, the seed and the digest of the training rows (:func:`rows_digest`)."""
    return {"base": {k: v for k, v in base.items() if k not in ("prebuilt", "rebuild")},
            "system_prompt": system_prompt, "common": common, "seed": seed, "train_rows": data_digest}


def rows_digest(rows) -> str:
    """sha256 of the training rows' text columns (question, solution, metadata; the image is drawn from the
    metadata), so a change of the synthetic data invalidates a prebuilt base but the PNG encoder's version does not."""
    h = hashlib.sha256()
    for row in zip(rows["question"], rows["solution"], rows["metadata"]):
        h.update(json.dumps(row).encode())
    return h.hexdigest()


def prebuilt_dir(name: str) -> Path:
    """A shipped base model: ``name`` under the repository's ``models/`` unless it is a path that exists."""
    from specs_jax.model.config import PRESET_DIR

    path = Path(name).expanduser()
    return path if path.is_dir() or path.is_absolute() else PRESET_DIR / name


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prebuilt_mismatch(path, key: dict) -> str | None:
    """Why the base model directory ``path`` cannot stand in for training with ``key`` (:func:`build_key`), or None:
    missing, built from other data or settings (names the differing keys), or a file whose checksum changed."""
    path = Path(path)
    if not (path / BUILD_FILE).is_file():
        return f"{path} has no {BUILD_FILE}"
    build = json.loads((path / BUILD_FILE).read_text())
    if build.get("key") != key:
        old = build.get("key", {})
        differ = sorted(k for k in {*old, *key} if old.get(k) != key.get(k))
        return f"{path} was built with other settings (they differ in {', '.join(differ)})"
    for name, digest in build.get("sha256", {}).items():
        if not (path / name).is_file() or file_sha256(path / name) != digest:
            return f"{path / name} does not match its checksum in {BUILD_FILE}"
    return None

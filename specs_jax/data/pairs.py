"""Self-distilled preference pairs for the SPECS cold start (METHOD.md section 2, stage 1).

From responses sampled by the exploratory policy (GRPO-zero) and the base policy:

- chosen ``y+``: a GRPO-zero response with the correct answer AND the correct format
  (:func:`~specs_jax.rewards.specs_reward` == 1.5), optionally kept only when the judge hook
  accepts it;
- rejected ``y-``: the correct answer with a broken format, either a corruption of the chosen
  response (kind drawn from ``corruption_mix``) or, with probability ``base_rejected_prob``
  while unused ones remain, a base response that is correct but unformatted
  (``format_reward == 0`` and ``accuracy_reward == 1``; ``corruption_kind`` ``"none"``).

So every pair differs in format, never in correctness. Each chosen response is used at most
once, so a prompt yields ``min(pairs_per_prompt, #chosen)`` pairs. All randomness comes from
one ``numpy`` generator seeded with ``seed`` and consumed in input order: the same input and
config give the same pairs. :func:`save_pairs` is the only function here doing I/O.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from specs_jax.rewards import CORRUPTION_KINDS, DEFAULT_TAG_TEXT, accuracy_reward, corrupt, has_format
from specs_jax.rewards.corrupt import validate_tag_text

BASE_KIND = "none"
SOURCES = ("grpo_zero", "base")
PAIR_FEATURES = datasets.Features(
    {
        name: datasets.Value("string")
        for name in ("prompt", "image", "chosen", "rejected", "corruption_kind", "source_policy", "answer")
    }
)
DROP_NO_CHOSEN = "prompt: no correct formatted response"
DROP_DUPLICATE = "response: duplicate"
DROP_JUDGE = "response: judge rejected"
DROP_SHORT = "pair: fewer correct formatted responses than pairs_per_prompt"

Judge = Callable[[str, str, str], bool]
"""``judge(prompt, response, answer) -> keep``: e.g. reasoning/answer consistency."""


def _check_texts(name: str, texts: object) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a sequence of strings, got {type(texts).__name__}")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{name} must hold only strings, found {bad[0]}")


@dataclass(frozen=True)
class PromptSamples:
    """One training prompt with its ground truth and the responses sampled from each policy.

    ``image`` is a reference (path or id), not pixels.
    """

    prompt: str
    answer: str
    grpo_zero: Sequence[str]
    base: Sequence[str] = ()
    image: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "answer"):
            if not isinstance(getattr(self, name), str):
                kind = type(getattr(self, name)).__name__
                raise TypeError(f"PromptSamples.{name} must be str, got {kind}")
        if self.image is not None and not isinstance(self.image, str):
            kind = type(self.image).__name__
            raise TypeError(f"PromptSamples.image must be a str reference or None, got {kind}")
        _check_texts("PromptSamples.grpo_zero", self.grpo_zero)
        _check_texts("PromptSamples.base", self.base)


@dataclass(frozen=True)
class PairConfig:
    """Options of :func:`build_pairs`.

    - ``pairs_per_prompt``: at most this many pairs per prompt (one per chosen response).
    - ``corruption_mix``: relative weights of the corruption kinds (uniform by default).
    - ``base_rejected_prob``: chance that a pair's rejected response is a correct unformatted
      base response rather than a corruption (0 disables base responses as rejected).
    - ``dedupe``: drop repeated chosen responses (same prompt, image and stripped text) and
      repeated base candidates.
    - ``seed``: seed of the single random generator.
    - ``tag_text``: plain-text replacements of ``tags_to_text``.
    - ``judge``: optional filter of chosen responses, off by default.
    """

    pairs_per_prompt: int = 1
    corruption_mix: Mapping[str, float] = field(
        default_factory=lambda: dict.fromkeys(CORRUPTION_KINDS, 1.0)
    )
    base_rejected_prob: float = 0.5
    dedupe: bool = True
    seed: int = 0
    tag_text: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TAG_TEXT))
    judge: Judge | None = None

    def __post_init__(self) -> None:
        count = self.pairs_per_prompt
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"pairs_per_prompt must be an int >= 1, got {self.pairs_per_prompt!r}")
        unknown = set(self.corruption_mix) - set(CORRUPTION_KINDS)
        if unknown:
            raise ValueError(f"corruption_mix has unknown kinds {sorted(unknown)}; known: {CORRUPTION_KINDS}")
        weights = list(self.corruption_mix.values())
        if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"corruption_mix weights must be finite, >= 0 and sum > 0, got {dict(self.corruption_mix)}"
            )
        if not 0.0 <= self.base_rejected_prob <= 1.0:
            raise ValueError(f"base_rejected_prob must be in [0, 1], got {self.base_rejected_prob}")
        if self.judge is not None and not callable(self.judge):
            raise TypeError("judge must be a callable (prompt, response, answer) -> bool or None")
        if self.corruption_mix.get("tags_to_text", 0) > 0:
            validate_tag_text(self.tag_text)


def _chosen_candidates(
    sample: PromptSamples, config: PairConfig, seen: set[tuple[str, str | None, str]], drops: Counter
) -> list[str]:
    """GRPO-zero responses that are correct and formatted, deduplicated and judged."""
    chosen = []
    for response in sample.grpo_zero:
        if not has_format(response) or accuracy_reward(response, sample.answer) != 1.0:
            continue
        key = (sample.prompt, sample.image, response.strip())
        if config.dedupe and key in seen:
            drops[DROP_DUPLICATE] += 1
            continue
        if config.judge is not None and not config.judge(sample.prompt, response, sample.answer):
            drops[DROP_JUDGE] += 1
            continue
        seen.add(key)
        chosen.append(response)
    return chosen


def _base_candidates(sample: PromptSamples, config: PairConfig, drops: Counter) -> list[str]:
    """Base responses that are correct but unformatted, deduplicated."""
    candidates: list[str] = []
    seen: set[str] = set()
    for response in sample.base:
        if has_format(response) or accuracy_reward(response, sample.answer) != 1.0:
            continue
        if config.dedupe and response.strip() in seen:
            drops[DROP_DUPLICATE] += 1
            continue
        seen.add(response.strip())
        candidates.append(response)
    return candidates


def build_pairs(
    samples: Iterable[PromptSamples], config: PairConfig = PairConfig()
) -> tuple[datasets.Dataset, dict]:
    """Build the chosen/rejected pairs (module docstring) and a JSON-ready summary.

    Dataset columns: prompt, image, chosen, rejected, corruption_kind (a kind of
    :data:`~specs_jax.rewards.CORRUPTION_KINDS` or ``"none"`` for base responses),
    source_policy (policy of the rejected response: ``"grpo_zero"`` or ``"base"``), answer.
    Summary: prompt and pair counts, counts per kind and per source, and dropped items per
    reason.
    """
    rng = np.random.default_rng(config.seed)
    kinds = list(config.corruption_mix)
    weights = np.array([config.corruption_mix[k] for k in kinds], dtype=np.float64)
    weights /= weights.sum()
    rows: list[dict[str, str | None]] = []
    drops: Counter = Counter()
    seen: set[tuple[str, str | None, str]] = set()
    n_prompts = n_with_pairs = 0
    for sample in samples:
        if not isinstance(sample, PromptSamples):
            raise TypeError(f"samples must be PromptSamples, got {type(sample).__name__}")
        n_prompts += 1
        chosen = _chosen_candidates(sample, config, seen, drops)
        if not chosen:
            drops[DROP_NO_CHOSEN] += 1
            continue
        n_with_pairs += 1
        base = _base_candidates(sample, config, drops)
        picks = rng.permutation(len(chosen))[: config.pairs_per_prompt]
        drops[DROP_SHORT] += config.pairs_per_prompt - len(picks)
        for index in picks:
            good = chosen[index]
            if base and rng.random() < config.base_rejected_prob:
                rejected, kind, source = base.pop(int(rng.integers(len(base)))), BASE_KIND, "base"
            else:
                kind = str(rng.choice(kinds, p=weights))
                rejected, source = corrupt(good, kind, config.tag_text), "grpo_zero"
            rows.append(
                {
                    "prompt": sample.prompt,
                    "image": sample.image,
                    "chosen": good,
                    "rejected": rejected,
                    "corruption_kind": kind,
                    "source_policy": source,
                    "answer": sample.answer,
                }
            )
    columns = {name: [row[name] for row in rows] for name in PAIR_FEATURES}
    dataset = datasets.Dataset.from_dict(columns, features=PAIR_FEATURES)
    summary = {
        "prompts": n_prompts,
        "prompts_with_pairs": n_with_pairs,
        "pairs": len(rows),
        "by_kind": {
            k: sum(r["corruption_kind"] == k for r in rows) for k in (*CORRUPTION_KINDS, BASE_KIND)
        },
        "by_source": {s: sum(r["source_policy"] == s for r in rows) for s in SOURCES},
        "dropped": {
            reason: drops[reason] for reason in (DROP_NO_CHOSEN, DROP_DUPLICATE, DROP_JUDGE, DROP_SHORT)
        },
        "config": {
            "pairs_per_prompt": config.pairs_per_prompt,
            "corruption_mix": dict(config.corruption_mix),
            "base_rejected_prob": config.base_rejected_prob,
            "dedupe": config.dedupe,
            "seed": config.seed,
            "tag_text": dict(config.tag_text),
            "judge": config.judge is not None,
        },
    }
    return dataset, summary


def save_pairs(dataset: datasets.Dataset, summary: Mapping, out_dir: str | Path) -> Path:
    """Write ``pairs.parquet`` and ``pairs_summary.json`` into ``out_dir``, print the summary,
    and return the parquet path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parquet = out / "pairs.parquet"
    dataset.to_parquet(str(parquet))
    text = json.dumps(summary, indent=2, sort_keys=False)
    (out / "pairs_summary.json").write_text(text + "\n")
    print(text)
    return parquet


SHAREGPT_FILE = "pairs_sharegpt.json"


def sharegpt_records(dataset: datasets.Dataset, system_prompt: str | None = None) -> list[dict]:
    """The pairs in LLaMA-Factory's ShareGPT preference format (the format SPECS's cold start was trained
    with): ``conversations`` (one human turn, the image as an ``<image>`` placeholder before the prompt
    text unless the prompt places it), ``chosen`` / ``rejected`` (``{"from": "gpt", "value": ...}``),
    ``images`` (the pair's image reference), ``system`` (when given), plus ``answer``,
    ``corruption_kind`` and ``source_policy`` (ignored by LLaMA-Factory)."""
    from specs_jax.data.formats import IMAGE_PLACEHOLDER

    records = []
    for row in dataset:
        images = [row["image"]] if row.get("image") else []
        prompt = row["prompt"]
        if images and IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER * len(images) + prompt
        record = {"conversations": [{"from": "human", "value": prompt}],
                  "chosen": {"from": "gpt", "value": row["chosen"]},
                  "rejected": {"from": "gpt", "value": row["rejected"]},
                  "images": images}
        if system_prompt is not None:
            record["system"] = system_prompt
        record.update({k: row[k] for k in ("answer", "corruption_kind", "source_policy") if k in row})
        records.append(record)
    return records


def save_sharegpt(dataset: datasets.Dataset, out_dir: str | Path, system_prompt: str | None = None,
                  name: str = "specs_pairs") -> Path:
    """Write :func:`sharegpt_records` to ``out_dir/pairs_sharegpt.json`` and a LLaMA-Factory
    ``dataset_info.json`` registering it as ``name`` (``dataset_dir: out_dir``, ``dataset: name``;
    relative image paths resolve against ``out_dir``, LLaMA-Factory's default media directory).
    Returns the JSON path; specs-jax reads it back with ``data.format: sharegpt`` (or auto)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SHAREGPT_FILE
    path.write_text(json.dumps(sharegpt_records(dataset, system_prompt), indent=1, ensure_ascii=False) + "\n")
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}
    if system_prompt is not None:
        columns["system"] = "system"
    info = {name: {"file_name": SHAREGPT_FILE, "formatting": "sharegpt", "ranking": True, "columns": columns}}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return path

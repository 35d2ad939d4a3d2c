"""Evaluation of a policy on prompt splits: greedy accuracy and format rate, pass@k from samples.

For each prompt of a split (tokenised with the chat template and its images by
:func:`specs_jax.data.pipeline.rl_batches`, in file order):

- one greedy decode (``temperature 0``), scored by :func:`specs_jax.rewards.score_batch`:
  ``accuracy = mean_i [R_acc(greedy_i) > 0]``, ``format_rate = mean_i [R_format(greedy_i) > 0]``,
  ``mean_length`` = mean number of completion tokens (EOS included) of the greedy responses;
- ``n = num_samples`` samples at ``temperature``: ``sample_accuracy`` and ``sample_format_rate``
  are the means over all ``N * n`` samples, and ``pass@k = mean_i (1 - C(n - c_i, k) / C(n, k))``
  with ``c_i`` correct samples of prompt ``i`` (the unbiased estimator,
  :func:`specs_jax.metrics.aggregate_by_split`).

:func:`split_metrics` is the pure aggregation; :func:`evaluate_split` and :func:`evaluate_model`
run the sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import jax
import numpy as np
from flax import nnx

from specs_jax.data.pipeline import DataConfig as PipelineConfig
from specs_jax.data.pipeline import rl_batches
from specs_jax.data.tokenizer import Processor
from specs_jax.metrics import aggregate_by_split
from specs_jax.model import Qwen2_5_VLForConditionalGeneration
from specs_jax.rewards import score_batch
from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams
from specs_jax.training.config import EvalConfig
from specs_jax.training.sharding import allgather_json, owns_batch, spans_processes

GREEDY = SamplingParams(temperature=0.0)
NUM_EXAMPLES = 8


def split_metrics(
    split: str,
    greedy_correct: Sequence[bool],
    greedy_formatted: Sequence[bool],
    greedy_lengths: Sequence[int],
    samples: Sequence[Mapping[str, Any]],
    ks: Sequence[int],
    n_skipped: int = 0,
) -> dict[str, float | int]:
    """Metrics of one split from its ``N`` greedy responses and its sample records (module docstring).

    ``greedy_*`` have one entry per prompt; ``samples`` are records ``{split, prompt_id, correct,
    formatted}`` with at least ``max(ks)`` per prompt. Returns ``accuracy``, ``format_rate``,
    ``mean_length`` (greedy), ``sample_accuracy``, ``sample_format_rate``, ``pass@k`` for each k,
    ``n_prompts``, ``n_samples`` and ``n_skipped`` (rows the pipeline could not use).
    """
    n = len(greedy_correct)
    if n == 0:
        raise ValueError(f"split {split!r} has no usable prompts ({n_skipped} rows skipped)")
    if len(greedy_formatted) != n or len(greedy_lengths) != n:
        raise ValueError(f"split {split!r}: greedy results differ in length: {n}, {len(greedy_formatted)}, "
                         f"{len(greedy_lengths)}")
    sampled = aggregate_by_split(samples, ks)[split]
    if int(sampled["n_prompts"]) != n:
        raise ValueError(f"split {split!r}: samples cover {int(sampled['n_prompts'])} prompts, greedy {n}")
    return {
        "accuracy": float(np.mean(np.asarray(greedy_correct, bool))),
        "format_rate": float(np.mean(np.asarray(greedy_formatted, bool))),
        "mean_length": float(np.mean(greedy_lengths)),
        "sample_accuracy": sampled["accuracy"],
        "sample_format_rate": sampled["format_rate"],
        **{f"pass@{k}": sampled[f"pass@{k}"] for k in ks},
        "n_prompts": n,
        "n_samples": int(sampled["n_samples"]),
        "n_skipped": n_skipped,
    }


def _batch_seed(seed: int, split: str, index: int) -> int:
    """A sampling seed per (run seed, split, batch), stable across processes and runs."""
    return int(np.random.SeedSequence([seed, index, *split.encode()]).generate_state(1)[0] >> 1)


def evaluate_split(
    sampler: Sampler,
    rows: datasets.Dataset,
    processor: Processor,
    cfg: EvalConfig,
    *,
    split: str,
    weights: dict | None = None,
    seed: int = 0,
    pipeline: PipelineConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """Evaluate the first ``cfg.max_examples`` rows (all when 0) of ``rows``; returns
    ``(split_metrics(...), greedy responses)``.

    ``sampler`` needs ``generate_ids`` and ``config.prompt_buckets`` (:class:`Sampler`); ``weights``
    (a pure parameter dict, e.g. a trainer's) replace the model's own. ``pipeline`` gives the
    columns, image root and system prompt of the rows (default :class:`PipelineConfig`); batches
    of ``cfg.batch_size`` prompts are read in order, once, padded to the sampler's prompt buckets
    (a longer prompt is skipped and counted in ``n_skipped``). On several processes the batches are shared
    round-robin (:func:`~specs_jax.training.sharding.owns_batch`; each keeps its one-process seed) and the
    results gathered, so every process returns what one process does; the model must then be each process's
    own copy (loaded on every host), not a global array of the job. ``on_batch(k)`` is called as ``k``
    more rows are consumed (skipped rows included), after each batch. Each greedy response is a
    dict ``row_id, question, answer, response, correct, formatted, length`` (completion tokens,
    EOS included); ``row_id`` indexes ``rows``.
    """
    if cfg.max_examples:
        rows = rows.select(range(min(cfg.max_examples, len(rows))))
    data = dataclasses.replace(pipeline or PipelineConfig(), batch_size=cfg.batch_size,
                               buckets=tuple(sampler.config.prompt_buckets), shuffle=False, num_epochs=1,
                               drop_remainder=False, shard_index=0, shard_count=1)
    sample_params = SamplingParams(temperature=cfg.temperature)
    n = cfg.num_samples
    _check_local(sampler, weights)
    batches = rl_batches(rows, processor, data)
    responses: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    reported = seen = 0
    for index, batch in enumerate(batches):
        seen += len(batch["row_id"])
        if not owns_batch(index):
            continue
        inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
        row_ids = [int(r) for r in batch["row_id"]]
        answers = batch["answer"]
        greedy = sampler.generate_ids(*inputs, n=1, params=GREEDY, seed=seed, weights=weights)
        scores = score_batch(greedy.texts, answers)
        lengths = np.asarray(greedy.mask).sum(-1)
        responses += [{"row_id": row_id, "question": question, "answer": answer, "response": text,
                       "correct": bool(acc > 0), "formatted": bool(fmt > 0), "length": int(length)}
                      for row_id, question, answer, text, acc, fmt, length in zip(
                          row_ids, batch["question"], answers, greedy.texts, scores.accuracy, scores.format, lengths)]
        sampled = sampler.generate_ids(*inputs, n=n, params=sample_params, seed=_batch_seed(seed, split, index),
                                       weights=weights)
        scores = score_batch(sampled.texts, [a for a in answers for _ in range(n)])  # prompt-major rows
        samples += [{"split": split, "prompt_id": row_ids[i // n], "correct": bool(acc > 0), "formatted": bool(fmt > 0)}
                    for i, (acc, fmt) in enumerate(zip(scores.accuracy, scores.format))]
        if on_batch is not None:
            consumed = seen + sum(batches.skipped.values())
            on_batch(consumed - reported)
            reported = consumed
    if on_batch is not None and len(rows) > reported:  # rows skipped after the last batch
        on_batch(len(rows) - reported)
    if jax.process_count() > 1:  # every process's results, in row order
        responses = sorted((r for part in allgather_json(responses) for r in part), key=lambda r: r["row_id"])
        samples = sorted((x for part in allgather_json(samples) for x in part), key=lambda x: x["prompt_id"])
    metrics = split_metrics(split, [r["correct"] for r in responses], [r["formatted"] for r in responses],
                            [r["length"] for r in responses], samples, cfg.ks,
                            n_skipped=sum(batches.skipped.values()))
    return metrics, responses


def _check_local(sampler: Sampler, weights: dict | None) -> None:
    """Refuse weights that are global arrays of a multi-process job (evaluation shares batches, not programs)."""
    if jax.process_count() > 1 and spans_processes(weights if weights is not None else nnx.state(sampler.model)):
        raise ValueError("evaluation on several processes runs each batch on one process: give it a model loaded on "
                         "each host (specs_jax.convert.io.load_model), not the global arrays of a training job")


def evaluate_model(
    model: Qwen2_5_VLForConditionalGeneration,
    processor: Processor,
    splits: Mapping[str, datasets.Dataset],
    cfg: EvalConfig,
    *,
    weights: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    pipeline: PipelineConfig | None = None,
    num_examples: int = NUM_EXAMPLES,
    sampler: Sampler | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_split` on every split with one :class:`Sampler` (``cfg.max_new_tokens`` new tokens).

    Returns ``{"splits": {name: metrics}, "examples": {name: first num_examples greedy responses}}``;
    ``progress`` shows a tqdm bar over prompts. ``sampler``: an existing sampler of the same architecture
    (with ``cfg.max_new_tokens``) to reuse its compiled programs across models (pass their ``weights``).
    """
    from tqdm import tqdm

    if not splits:
        raise ValueError("no evaluation splits given (config key 'eval.splits')")
    if sampler is None:
        sampler = Sampler(model, processor, SamplerConfig(max_new_tokens=cfg.max_new_tokens))
    elif sampler.config.max_new_tokens != cfg.max_new_tokens:
        raise ValueError(f"sampler generates {sampler.config.max_new_tokens} tokens, eval.max_new_tokens is "
                         f"{cfg.max_new_tokens}")
    total = sum(min(len(rows), cfg.max_examples) if cfg.max_examples else len(rows) for rows in splits.values())
    results: dict[str, dict[str, Any]] = {"splits": {}, "examples": {}}
    with tqdm(total=total, unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for name, rows in splits.items():
            bar.set_description(f"eval {name}")
            metrics, responses = evaluate_split(sampler, rows, processor, cfg, split=name, weights=weights, seed=seed,
                                                pipeline=pipeline, on_batch=bar.update)
            results["splits"][name] = metrics
            results["examples"][name] = responses[:num_examples]
    return results

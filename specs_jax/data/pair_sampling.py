"""SPECS stage 1 with models (METHOD.md section 2): sample responses of GRPO-zero and of the base model on
training prompts and write the self-distilled pairs; used by ``specs-jax data pairs`` and by the pipeline.

The pair rules themselves are :func:`specs_jax.data.pairs.build_pairs` (pure, no models); this module
loads the models (:class:`Policies`, whose samplers the pipeline also uses for evaluation and RBF) and
writes files (:func:`sample_pairs`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

__all__ = ["PairsConfig", "Policies", "sample_pairs"]


@dataclasses.dataclass
class PairsConfig:
    """Stage 1: ``prompts`` training prompts, ``samples`` responses each from GRPO-zero and from the base
    model at ``temperature``; pairs by :func:`specs_jax.data.pairs.build_pairs`."""

    prompts: int = 256
    samples: int = 8
    temperature: float = 1.0
    pairs_per_prompt: int = 2
    base_rejected_prob: float = 0.5


class Policies:
    """Samplers shared by every model of a run (same architecture): each shape compiles once; a
    model enters as ``weights``. ``top_probs``: the sampler also returns top-k probabilities (RBF)."""

    def __init__(self, base: Path, max_new_tokens: int, dtype: str = "float32"):
        from specs_jax.convert.io import load_model
        from specs_jax.data.tokenizer import load_processor

        self.dtype = dtype
        self.model = load_model(base, dtype)
        self.processor = load_processor(base)
        self.max_new_tokens = max_new_tokens
        self._samplers: dict[int, Any] = {}

    def sampler(self, top_probs: int = 0):
        from specs_jax.sampling import Sampler, SamplerConfig

        if top_probs not in self._samplers:
            self._samplers[top_probs] = Sampler(self.model, self.processor,
                                                SamplerConfig(max_new_tokens=self.max_new_tokens, top_probs=top_probs))
        return self._samplers[top_probs]

    def weights(self, model_dir: Path):
        from flax import nnx

        from specs_jax.convert.io import load_model

        return nnx.state(load_model(model_dir, self.dtype))

    def sample(self, model_dir: Path, rows, system_prompt: str, n: int, temperature: float, seed: int,
               top_probs: int = 0):
        """``n`` sampled responses per row of ``rows`` (prompt-major): (texts, row index of each,
        top-k probabilities per batch, masks per batch). On several processes the batches are shared round-robin
        (each with its one-process seed) and the results gathered: every process returns what one process does."""
        from specs_jax.data.pipeline import DataConfig, rl_batches
        from specs_jax.sampling import SamplingParams
        from specs_jax.training.sharding import owns_batch

        sampler, weights = self.sampler(top_probs), self.weights(model_dir)
        batches = rl_batches(rows, self.processor, DataConfig(batch_size=16, buckets=sampler.config.prompt_buckets,
                                                              shuffle=False,
                                                              num_epochs=1, drop_remainder=False,
                                                              system_prompt=system_prompt, read_threads=1))
        done, texts, row_ids, probs, masks = [], [], [], [], []  # per batch this process ran
        for i, batch in enumerate(batches):
            if not owns_batch(i):
                continue
            gen = sampler.generate_ids(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                       batch.get("image_grid_thw"), n=n, params=SamplingParams(temperature=temperature),
                                       seed=seed * 1000 + i, weights=weights)
            done.append(i)
            texts.append(gen.texts)
            row_ids.append([int(r) for r in batch["row_id"] for _ in range(n)])
            probs.append(gen.top_probs)
            masks.append(gen.mask)
        if jax.process_count() > 1:
            texts, row_ids, masks, probs = _gathered_batches(done, texts, row_ids, masks, probs)
        return [t for part in texts for t in part], [r for part in row_ids for r in part], probs, masks

    def evaluate(self, model_dir: Path, eval_rows: dict, ecfg, system_prompt: str, seed: int) -> dict:
        from specs_jax.data.pipeline import DataConfig
        from specs_jax.evaluation import evaluate_model

        return evaluate_model(None, self.processor, eval_rows, ecfg, seed=seed, weights=self.weights(model_dir),
                              pipeline=DataConfig(system_prompt=system_prompt, read_threads=1),
                              sampler=self.sampler())


def _gathered_batches(done: list[int], texts: list, row_ids: list, masks: list, probs: list) -> tuple[list, ...]:
    """Every process's per-batch results (``done``: the batch indices this process ran), in batch order."""
    from specs_jax.training.sharding import allgather_arrays, allgather_json

    meta = allgather_json([done, texts, row_ids])
    arrays = allgather_arrays([*masks, *(p for p in probs if p is not None)])
    batches = []
    for (ran, part_texts, part_rows), part_arrays in zip(meta, arrays):
        k = len(ran)
        part_probs = part_arrays[k:] if len(part_arrays) > k else [None] * k
        batches += zip(ran, part_texts, part_rows, part_arrays[:k], part_probs)
    batches.sort(key=lambda b: b[0])
    return tuple([b[j] for b in batches] for j in range(1, 5))


def _image_reference(cell: Any, row_id: Any, images: Path, image_root: str | None, write: bool = True) -> str | None:
    """A pair's image reference: image bytes are written (when ``write``) to ``images/<row_id>.png`` (relative to
    the pairs directory); a path stays a path (made absolute with ``image_root``)."""
    cells = [] if cell is None else list(cell) if isinstance(cell, (list, tuple)) else [cell]
    if len(cells) > 1:
        raise ValueError(f"row {row_id}: preference pairs support one image per prompt, got {len(cells)}")
    if not cells:
        return None
    cell = cells[0]
    if isinstance(cell, dict) and cell.get("bytes") is not None:
        if write:
            (images / f"{row_id}.png").write_bytes(cell["bytes"])
        return f"{images.name}/{row_id}.png"
    path = Path(cell["path"] if isinstance(cell, dict) else cell)
    return str(path if path.is_absolute() or image_root is None else (Path(image_root) / path).absolute())


def sample_pairs(policies: Policies, grpo_zero: Path, base: Path, rows, out: Path, cfg: PairsConfig,
                 system_prompt: str | None, seed: int, image_root: str | None = None) -> dict:
    """Stage 1: ``cfg.samples`` responses per prompt of ``rows`` (question, image, answer) from GRPO-zero
    and from the base model, pairs by :func:`specs_jax.data.pairs.build_pairs`, written to
    ``out/pairs.parquet`` (images under ``out/images``); returns the pair statistics."""
    from specs_jax.data.pairs import PairConfig, PromptSamples, build_pairs, save_pairs

    rows = rows.select(range(min(cfg.prompts, len(rows)))) if cfg.prompts else rows
    sampled = {name: policies.sample(path, rows, system_prompt, cfg.samples, cfg.temperature, seed)[:2]
               for name, path in (("grpo_zero", grpo_zero), ("base", base))}
    images = out / "images"
    writer = jax.process_index() == 0  # several processes: each samples a share, process 0 writes the files
    if writer:
        images.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, row in enumerate(rows):
        by = {name: [t for t, r in zip(*sampled[name]) if r == i] for name in sampled}
        samples.append(PromptSamples(prompt=row["question"], answer=str(row["answer"]), grpo_zero=by["grpo_zero"],
                                     base=by["base"],
                                     image=_image_reference(row.get("image"), row.get("id", i), images, image_root,
                                                            writer)))
    dataset, summary = build_pairs(samples, PairConfig(pairs_per_prompt=cfg.pairs_per_prompt,
                                                       base_rejected_prob=cfg.base_rejected_prob, seed=seed))
    if len(dataset) == 0:
        raise ValueError("GRPO-zero produced no correct, formatted response on the sampled training prompts: "
                         "no preference pairs (train GRPO-zero longer, or sample more prompts)")
    if writer:
        save_pairs(dataset, summary, out)
    return summary

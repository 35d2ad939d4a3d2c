"""Does a model read its images? For each model of a run and each evaluation split:

- ``real`` / ``blank``: greedy accuracy with the real images and with the same questions on blank (white) images
  of the same size (:func:`blank_rows`). Equal accuracy means the answers come from the question text alone
  (the answer prior): RL and the cold start then have no visual skill to sharpen, and the run cannot test the
  paper's claims (:func:`blind_base`).
- ``nll_real`` / ``nll_blank``: the model's mean per-token NLL of the reference solutions (teacher-forced, the
  base model's plain-text SFT targets) with either image. A model that reads its images finds the real
  description likelier.

:func:`image_use` measures it (written by the pipeline's eval stage to ``eval/image_use.json``);
``scripts/diagnose_image_use.py`` runs it on an existing run directory.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MIN_ID_GAIN = 0.15  # real-minus-blank greedy ID accuracy of the base model below which a run is flagged


def blank_image(row: Mapping[str, Any]) -> dict:
    """The row's image replaced by a white image of the same size (PNG bytes)."""
    from PIL import Image

    size = Image.open(io.BytesIO(row["image"]["bytes"])).size
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 255, 255)).save(buf, "PNG")
    return {"image": {"bytes": buf.getvalue(), "path": None}}


def blank_rows(rows):
    """``rows`` (a ``datasets.Dataset`` with embedded image bytes) with every image blanked."""
    return rows.map(blank_image)


def solution_nll(model, processor, rows, system_prompt: str | None, max_length: int, batch_size: int = 32) -> float:
    """Mean per-token NLL of ``plain_response(solution)`` given the prompt and image of each row (teacher-forced),
    over all rows (rows longer than ``max_length`` are skipped)."""
    import jax.numpy as jnp

    from specs_jax.data.pipeline import DataConfig, sft_batches
    from specs_jax.losses import token_logps
    from specs_jax.pipeline.base_model import plain_response

    rows = rows.add_column("response", [plain_response(x) for x in rows["solution"]])
    data = DataConfig(batch_size=batch_size, buckets=(max_length,), shuffle=False, num_epochs=1, drop_remainder=False,
                      system_prompt=system_prompt, read_threads=1)
    total = count = 0.0
    for batch in sft_batches(rows, processor, data):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
        logp = np.asarray(token_logps(logits[:, :-1], jnp.asarray(batch["input_ids"][:, 1:])))
        mask = (batch["loss_mask"] * batch["attention_mask"])[:, 1:]
        total -= float((logp * mask).sum())
        count += float(mask.sum())
    return total / max(count, 1.0)


def greedy_accuracy(policies, model_dir: Path, rows, system_prompt: str | None) -> float:
    """Share of ``rows`` whose greedy response (``policies``' sampler) has the right answer (``R_acc > 0``)."""
    from specs_jax.rewards import score_batch

    texts, row_ids, _, _ = policies.sample(model_dir, rows, system_prompt, 1, 0.0, 0)
    answers = [str(rows[i]["answer"]) for i in row_ids]
    return float((score_batch(texts, answers).accuracy > 0).mean())


def image_use(policies, models: Mapping[str, Path], eval_rows: Mapping[str, Any], system_prompt: str | None,
              max_length: int, real: Mapping[str, Mapping[str, Mapping]] | None = None) -> dict:
    """``{model: {split: {"real", "blank", "nll_real", "nll_blank"}}}`` for the models ``{name: model dir}`` on the
    splits ``eval_rows``, with the run's :class:`~specs_jax.data.pair_sampling.Policies` (its samplers).
    ``real``: greedy accuracies already measured by the evaluation (``{model: {split: {"accuracy": ...}}}``), used
    instead of decoding the real images again."""
    from specs_jax.convert.io import load_model

    blank = {split: blank_rows(rows) for split, rows in eval_rows.items()}
    out: dict[str, dict] = {}
    for name, path in models.items():
        known = (real or {}).get(name) or {}
        model = load_model(path, policies.dtype)
        out[name] = {}
        for split, rows in eval_rows.items():
            acc = known[split]["accuracy"] if split in known else greedy_accuracy(policies, path, rows, system_prompt)
            out[name][split] = {
                "real": float(acc), "blank": greedy_accuracy(policies, path, blank[split], system_prompt),
                "nll_real": solution_nll(model, policies.processor, rows, system_prompt, max_length),
                "nll_blank": solution_nll(model, policies.processor, blank[split], system_prompt, max_length)}
    return out


def blind_base(use: Mapping[str, Mapping[str, Mapping[str, float]]] | None, split: str = "id_test") -> str | None:
    """Why the run cannot test the paper's claims, or None: the base model's real-minus-blank greedy accuracy on
    ``split`` is below :data:`MIN_ID_GAIN` (it answers from the question text, not the image)."""
    base = ((use or {}).get("base") or {}).get(split)
    if not base:
        return None
    gain = base["real"] - base["blank"]
    if gain >= MIN_ID_GAIN:
        return None
    return (f"the base model does not read its images: its greedy {split} accuracy is {base['real']:.3f} with the "
            f"real images and {base['blank']:.3f} with blank ones (gain {gain:+.3f} < {MIN_ID_GAIN}), so its "
            "answers come from the question text and the run cannot test the paper's claims")

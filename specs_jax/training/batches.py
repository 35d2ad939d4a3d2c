"""The trainer's data interface: host-side numpy batches -> prepared, micro-batched step inputs.

A data source yields plain numpy dicts, one per optimizer step, holding the global batch (or, on
a multi-host job, this host's rows of it; see :func:`sharding.process_batch_slice`), in the
format of :mod:`specs_jax.data.pipeline` (``sft_batches`` / ``preference_batches``):

- SFT: ``input_ids [B, T]`` int, ``attention_mask [B, T]``, ``loss_mask [B, T]`` (1 on the
  tokens to learn, i.e. the response, aligned with ``input_ids``; 0 on prompt and padding).
- DPO: the same three arrays with ``2B`` rows: the chosen rows ``0..B-1``, then the rejected
  rows ``B..2B-1`` of the same pairs in the same order; optionally ``ref_logps [2B, T]``
  (precomputed reference log-probs, aligned with :attr:`SeqBatch.labels`).
- Optional images for both: ``pixel_values [N, C*T*P*P]`` and ``image_grid_thw [I, 3]`` as
  transformers' processor returns them (or None), images in row-major order of their
  ``<|image_pad|>`` tokens (for DPO: the chosen rows' images, then the same for the rejected rows).
  Other keys (``row_id``, ...) are ignored.

:func:`prepare_sft` / :func:`prepare_dpo` split the rows into ``grad_accum_steps`` micro-batches
(for DPO: of whole pairs), prepare each with :func:`specs_jax.model.prepare_inputs` and stack them
on a leading axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from specs_jax.model import ModelConfig, ModelInputs, image_rows, prepare_inputs, row_patches
from specs_jax.training.sharding import agree_max

__all__ = ["SeqBatch", "pow2_bucket", "prepare_dpo", "prepare_grpo", "prepare_sequences", "prepare_sft",
           "stack_micro"]

ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")
REF_KEY = "ref_logps"


class SeqBatch(NamedTuple):
    """Prepared sequences: model inputs, next-token ``labels [b, T]`` (``labels[t] = input_ids[t+1]``),
    0/1 ``mask [b, T]`` of the label positions that count, optional reference log-probs ``[b, T]``,
    and optional per-row arrays ``rows`` (``[b]`` or ``[b, T]`` aligned with ``labels``; e.g. GRPO's
    ``old_logps`` and ``advantages``). Stacked for a step, every leaf gets a leading micro-batch axis."""

    inputs: ModelInputs
    labels: np.ndarray
    mask: np.ndarray
    ref_logps: np.ndarray | None = None
    rows: dict[str, np.ndarray] | None = None


def pow2_bucket(n: int, minimum: int = 64) -> int:
    """The smallest power of two ``>= max(n, minimum)``. Every row's image patches are padded to it (the
    per-row budget of :class:`~specs_jax.model.VisionInputs`), so batches of other image sizes reuse the
    compiled step."""
    return 1 << (max(n, minimum) - 1).bit_length()


def prepare_sequences(cfg: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray,
                      loss_mask: np.ndarray, pixel_values: np.ndarray | None = None,
                      image_grid_thw: np.ndarray | None = None,
                      ref_logps: np.ndarray | None = None, rows: dict[str, np.ndarray] | None = None,
                      patches: int | None = None) -> SeqBatch:
    """One :class:`SeqBatch`: the label at position ``t`` is token ``t+1``; it counts where token
    ``t+1`` is an attended ``loss_mask`` token (the last position never counts). ``patches``: every row's
    image patch budget (:func:`specs_jax.model.prepare_inputs`'s ``patch_bucket``)."""
    ids = np.asarray(input_ids)
    attn = np.asarray(attention_mask).astype(bool)
    resp = np.asarray(loss_mask).astype(bool)
    if resp.shape != ids.shape:
        raise ValueError(f"loss_mask shape {resp.shape} != input_ids shape {ids.shape}")
    if patches is not None and pixel_values is None:  # no image here, but in other micro-batches: padding only
        pixel_values = np.zeros((0, cfg.vision.patch_dim), np.float32)
        image_grid_thw = np.zeros((0, 3), np.int64)
    inputs = prepare_inputs(cfg, ids, attn, pixel_values, image_grid_thw, patch_bucket=patches,
                            image_rows_only=False)  # images stay with their rows: sharded and split by rows
    labels = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1).astype(np.int32)
    mask = np.concatenate([resp[:, 1:] & attn[:, 1:], np.zeros_like(resp[:, :1])], axis=1).astype(np.float32)
    if ref_logps is not None:
        ref_logps = np.asarray(ref_logps, np.float32)
        if ref_logps.shape != ids.shape:
            raise ValueError(f"reference log-probs shape {ref_logps.shape} != input_ids shape {ids.shape}")
    if rows is not None:
        rows = {k: np.asarray(v) for k, v in rows.items()}
        wrong = {k: v.shape for k, v in rows.items() if v.shape[:1] != ids.shape[:1] or v.ndim > 2
                 or (v.ndim == 2 and v.shape != ids.shape)}
        if wrong:
            raise ValueError(f"per-row arrays {wrong} must be [{ids.shape[0]}] or {list(ids.shape)}")
    return SeqBatch(inputs, labels, mask, ref_logps, rows)


def select_images(cfg: ModelConfig, batch: Mapping[str, np.ndarray],
                  rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(pixel_values, image_grid_thw)`` of the images that ``rows`` of ``batch`` show, in the order of
    ``rows`` (a row listed twice repeats its images); ``(None, None)`` when they show none."""
    if batch.get("pixel_values") is None:
        return None, None
    grid = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
    image_row = image_rows(cfg, batch["input_ids"], batch["attention_mask"], grid)
    patch_end = np.cumsum(grid.prod(-1))
    patch_start = patch_end - grid.prod(-1)
    keep = [i for r in rows for i in np.flatnonzero(image_row == r)]
    if not keep:
        return None, None
    pixels = np.asarray(batch["pixel_values"])
    return np.concatenate([pixels[patch_start[i]:patch_end[i]] for i in keep]), grid[keep]


def pad_columns(batch: Mapping[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """``batch`` with its ``[rows, T]`` arrays (those shaped like ``input_ids``) padded on the right with zeros to
    ``width`` columns: padding, since ``attention_mask`` and ``loss_mask`` are 0 there."""
    shape = np.shape(batch["input_ids"])
    extra = width - shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {shape[1]} columns to {width}")
    return {k: np.pad(v, ((0, 0), (0, extra))) if extra and isinstance(v, np.ndarray) and v.shape == shape else v
            for k, v in batch.items()}


def _prepare_rows(cfg: ModelConfig, batch: Mapping[str, np.ndarray], row_sets: list[np.ndarray],
                  per_row: tuple[str, ...] = ()) -> SeqBatch:
    """Stacked :class:`SeqBatch` of micro-batches, micro-batch ``i`` holding rows ``row_sets[i]`` of
    ``batch`` with the images those rows show and the ``per_row`` arrays of those rows in
    :attr:`SeqBatch.rows`. The columns and every row's image patches are padded to widths that all processes of
    the job agree on (:func:`~specs_jax.training.sharding.agree_max`), the patches to a :func:`pow2_bucket`."""
    patches = row_patches(cfg, batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"))
    width, most = agree_max(np.shape(batch["input_ids"])[1], patches.max(initial=0))
    batch = pad_columns(batch, width)
    patches = pow2_bucket(most) if most else None
    images = [select_images(cfg, batch, rows) for rows in row_sets]
    parts = []
    for rows, (pixels, grid) in zip(row_sets, images):
        out = {k: np.asarray(batch[k])[rows] for k in (*ROW_KEYS, REF_KEY, *per_row) if batch.get(k) is not None}
        parts.append(prepare_sequences(cfg, out["input_ids"], out["attention_mask"], out["loss_mask"], pixels, grid,
                                       out.get(REF_KEY), {k: out[k] for k in per_row} or None, patches))
    return stack_micro(parts)


def stack_micro(parts: list[SeqBatch]) -> SeqBatch:
    """Stack micro-batches on a new leading axis; their shapes (image patches included) must agree."""
    import jax

    first = jax.tree.structure(parts[0])
    for i, p in enumerate(parts[1:], 1):
        if jax.tree.structure(p) != first:
            raise ValueError(f"micro-batch {i} differs in structure from micro-batch 0 (one has images or "
                             "reference log-probs, the other not)")
        for a, b in zip(jax.tree.leaves(parts[0]), jax.tree.leaves(p)):
            if a.shape != b.shape:
                raise ValueError(f"micro-batch {i} has an array of shape {b.shape} where micro-batch 0 has "
                                 f"{a.shape}; gradient accumulation needs equal shapes per micro-batch (with "
                                 "images: the same number of patches in every micro-batch)")
    return jax.tree.map(lambda *xs: np.stack(xs), *parts)


def _micro_rows(n_rows: int, accum: int) -> list[np.ndarray]:
    if n_rows % accum:
        raise ValueError(f"batch of {n_rows} rows (or pairs) is not divisible by grad_accum_steps={accum}")
    return np.split(np.arange(n_rows), accum)


def _check_keys(batch: Mapping[str, np.ndarray], kind: str, keys: tuple[str, ...] = ROW_KEYS) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{kind} batch is missing {missing}; it has {sorted(batch)}")


def prepare_sft(cfg: ModelConfig, batch: Mapping[str, np.ndarray], accum: int) -> SeqBatch:
    """SFT batch dict -> stacked :class:`SeqBatch` ``[accum, B/accum, ...]``."""
    _check_keys(batch, "SFT")
    return _prepare_rows(cfg, batch, _micro_rows(len(batch["input_ids"]), accum))


def pair_rows(pairs: np.ndarray, n_pairs: int) -> np.ndarray:
    """Host rows of the pairs ``pairs`` of a ``2 * n_pairs``-row preference batch (chosen rows, then rejected
    rows), interleaved: ``[c_0, r_0, c_1, r_1, ...]``. Every contiguous block of a step batch then holds whole
    pairs, so the rows shard over devices and processes like any batch (chosen: even rows, rejected: odd)."""
    return np.stack([pairs, pairs + n_pairs], 1).reshape(-1)


def prepare_dpo(cfg: ModelConfig, batch: Mapping[str, np.ndarray], accum: int) -> SeqBatch:
    """DPO batch dict (``2B`` rows, chosen then rejected) -> stacked :class:`SeqBatch`
    ``[accum, 2*B/accum, ...]``: each micro-batch holds ``b`` pairs, each pair's chosen row then its rejected
    row (:func:`pair_rows`)."""
    _check_keys(batch, "DPO")
    n_rows = len(batch["input_ids"])
    if n_rows % 2:
        raise ValueError(f"a DPO batch has 2B rows (chosen, then rejected), got {n_rows}")
    pairs = n_rows // 2
    return _prepare_rows(cfg, batch, [pair_rows(p, pairs) for p in _micro_rows(pairs, accum)])


GRPO_KEYS = ("old_logps", "advantages")


def prepare_grpo(cfg: ModelConfig, batch: Mapping[str, np.ndarray], accum: int) -> SeqBatch:
    """GRPO batch dict (prompt + completion rows with ``old_logps [R, T]`` aligned with the labels and
    ``advantages [R]``, see :func:`specs_jax.training.grpo.rollout_sequences`; optionally ``sampler_logps [R, T]``)
    -> stacked :class:`SeqBatch` ``[accum, R/accum, ...]`` with those in :attr:`SeqBatch.rows`."""
    _check_keys(batch, "GRPO", ROW_KEYS + GRPO_KEYS)
    keys = GRPO_KEYS + (("sampler_logps",) if "sampler_logps" in batch else ())
    return _prepare_rows(cfg, batch, _micro_rows(len(batch["input_ids"]), accum), keys)

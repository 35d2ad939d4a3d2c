"""The trainer's data interface: host-side numpy batches -> prepared, micro-batched step inputs.

A data source yields plain numpy dicts, one per optimizer step, holding the global batch (or, on
a multi-host job, this host's rows of it; see :func:`sharding.process_batch_slice`):

- SFT: ``input_ids [B, T]`` int, ``attention_mask [B, T]``, ``response_mask [B, T]`` (1 on the
  tokens to learn, i.e. the response; 0 on prompt and padding).
- DPO: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_response_mask`` and the same
  three ``rejected_*`` arrays, all ``[B, T]`` (chosen and rejected padded to one ``T``);
  optionally ``ref_chosen_logps``/``ref_rejected_logps [B, T]`` (precomputed reference, aligned
  with :attr:`SeqBatch.labels`).
- Optional images for both: ``pixel_values [N, C*T*P*P]`` and ``image_grid_thw [I, 3]`` as
  transformers' processor returns them, images in row-major order of their ``<|image_pad|>``
  tokens (for DPO, the images of the chosen rows; the rejected row of a pair shows the same image).

:func:`prepare_sft` / :func:`prepare_dpo` split the rows into ``grad_accum_steps`` micro-batches,
prepare each with :func:`specs_jax.model.prepare_inputs` and stack them on a leading axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from specs_jax.model import ModelConfig, ModelInputs, prepare_inputs

__all__ = ["SeqBatch", "prepare_dpo", "prepare_sequences", "prepare_sft", "stack_micro"]

SFT_KEYS = ("input_ids", "attention_mask", "response_mask")
DPO_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in SFT_KEYS)
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


class SeqBatch(NamedTuple):
    """Prepared sequences: model inputs, next-token ``labels [b, T]`` (``labels[t] = input_ids[t+1]``),
    0/1 ``mask [b, T]`` of the label positions that count, optional reference log-probs ``[b, T]``.
    Stacked for a step, every leaf gets a leading micro-batch axis."""

    inputs: ModelInputs
    labels: np.ndarray
    mask: np.ndarray
    ref_logps: np.ndarray | None = None


def prepare_sequences(cfg: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray,
                      response_mask: np.ndarray, pixel_values: np.ndarray | None = None,
                      image_grid_thw: np.ndarray | None = None,
                      ref_logps: np.ndarray | None = None) -> SeqBatch:
    """One :class:`SeqBatch`: the label at position ``t`` is token ``t+1``; it counts where token
    ``t+1`` is an attended response token (the last position never counts)."""
    ids = np.asarray(input_ids)
    attn = np.asarray(attention_mask).astype(bool)
    resp = np.asarray(response_mask).astype(bool)
    if resp.shape != ids.shape:
        raise ValueError(f"response_mask shape {resp.shape} != input_ids shape {ids.shape}")
    inputs = prepare_inputs(cfg, ids, attn, pixel_values, image_grid_thw)
    labels = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1).astype(np.int32)
    mask = np.concatenate([resp[:, 1:] & attn[:, 1:], np.zeros_like(resp[:, :1])], axis=1).astype(np.float32)
    if ref_logps is not None:
        ref_logps = np.asarray(ref_logps, np.float32)
        if ref_logps.shape != ids.shape:
            raise ValueError(f"reference log-probs shape {ref_logps.shape} != input_ids shape {ids.shape}")
    return SeqBatch(inputs, labels, mask, ref_logps)


def _image_rows(cfg: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray,
                grid: np.ndarray) -> np.ndarray:
    """Row index of every image (images are in row-major order of their image tokens)."""
    per_row = ((input_ids == cfg.image_token_id) & attention_mask.astype(bool)).sum(1)
    per_image = grid.prod(-1) // cfg.vision.spatial_merge_size**2
    ends = np.cumsum(per_image)
    rows = np.searchsorted(np.cumsum(per_row), ends, side="left")
    if ends[-1] != per_row.sum():
        raise ValueError(f"image_grid_thw describes {ends[-1]} image tokens, input_ids hold {per_row.sum()}")
    return rows


def _select_rows(cfg: ModelConfig, batch: Mapping[str, np.ndarray], rows: np.ndarray, row_keys: tuple[str, ...],
                 id_key: str, mask_key: str) -> dict[str, np.ndarray]:
    """The given rows of ``batch`` (``row_keys`` arrays) with the images those rows show."""
    out = {k: np.asarray(batch[k])[rows] for k in row_keys if k in batch}
    if batch.get("pixel_values") is not None:
        grid = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
        image_row = _image_rows(cfg, np.asarray(batch[id_key]), np.asarray(batch[mask_key]), grid)
        patch_end = np.cumsum(grid.prod(-1))
        patch_start = patch_end - grid.prod(-1)
        keep = [i for r in rows for i in np.flatnonzero(image_row == r)]
        pixels = np.asarray(batch["pixel_values"])
        out["pixel_values"] = np.concatenate([pixels[patch_start[i]:patch_end[i]] for i in keep]) if keep else None
        out["image_grid_thw"] = grid[keep] if keep else None
    return out


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
        raise ValueError(f"batch of {n_rows} rows is not divisible by grad_accum_steps={accum}")
    return np.split(np.arange(n_rows), accum)


def _check_keys(batch: Mapping[str, np.ndarray], keys: tuple[str, ...], kind: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{kind} batch is missing {missing}; it has {sorted(batch)}")


def prepare_sft(cfg: ModelConfig, batch: Mapping[str, np.ndarray], accum: int) -> SeqBatch:
    """SFT batch dict -> stacked :class:`SeqBatch` ``[accum, B/accum, ...]``."""
    _check_keys(batch, SFT_KEYS, "SFT")
    parts = []
    for rows in _micro_rows(len(batch["input_ids"]), accum):
        sel = _select_rows(cfg, batch, rows, SFT_KEYS, "input_ids", "attention_mask")
        parts.append(prepare_sequences(cfg, sel["input_ids"], sel["attention_mask"], sel["response_mask"],
                                       sel.get("pixel_values"), sel.get("image_grid_thw")))
    return stack_micro(parts)


def prepare_dpo(cfg: ModelConfig, batch: Mapping[str, np.ndarray], accum: int) -> SeqBatch:
    """DPO batch dict -> stacked :class:`SeqBatch` ``[accum, 2*B/accum, ...]``: each micro-batch holds
    its ``b`` chosen rows, then the ``b`` rejected rows of the same pairs (sharing their images)."""
    _check_keys(batch, DPO_KEYS, "DPO")
    has_ref = [k in batch for k in REF_KEYS]
    if any(has_ref) and not all(has_ref):
        raise ValueError(f"DPO batch has only one of {REF_KEYS}")
    ids_c, ids_r = np.asarray(batch["chosen_input_ids"]), np.asarray(batch["rejected_input_ids"])
    if ids_c.shape != ids_r.shape:
        raise ValueError(f"chosen_input_ids {ids_c.shape} and rejected_input_ids {ids_r.shape} must have one "
                         "shape (pad both to the same length)")
    keys = DPO_KEYS + (REF_KEYS if all(has_ref) else ())
    parts = []
    for rows in _micro_rows(len(ids_c), accum):
        sel = _select_rows(cfg, batch, rows, keys, "chosen_input_ids", "chosen_attention_mask")
        both = {k: np.concatenate([sel[f"chosen_{k}"], sel[f"rejected_{k}"]]) for k in SFT_KEYS}
        pixels, grid = sel.get("pixel_values"), sel.get("image_grid_thw")
        if pixels is not None:
            pixels, grid = np.concatenate([pixels, pixels]), np.concatenate([grid, grid])
        ref = np.concatenate([sel["ref_chosen_logps"], sel["ref_rejected_logps"]]) if all(has_ref) else None
        parts.append(prepare_sequences(cfg, both["input_ids"], both["attention_mask"], both["response_mask"],
                                       pixels, grid, ref))
    return stack_micro(parts)

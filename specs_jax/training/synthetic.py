"""Synthetic data: random token ids (and optionally one random image per row) in the trainer's batch
format (:mod:`specs_jax.training.batches`), from a resumable, checkpointable source."""

from __future__ import annotations

from typing import Any

import numpy as np

from specs_jax.model import ModelConfig

__all__ = ["SyntheticSource", "random_dpo_batch", "random_sft_batch"]


def _rows(cfg: ModelConfig, rs: np.random.RandomState, batch: int, length: int, response_fraction: float,
          image_grid: tuple[int, int, int] | None) -> dict[str, np.ndarray]:
    """Left-aligned rows: prompt (with the image tokens first), response, then random right padding."""
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    vocab = min(cfg.text.vocab_size, min(special))
    ids = rs.randint(0, vocab, size=(batch, length)).astype(np.int32)
    n_img = 0
    if image_grid is not None:
        n_img = int(np.prod(image_grid)) // cfg.vision.spatial_merge_size**2
        ids[:, 0] = cfg.vision_start_token_id
        ids[:, 1:1 + n_img] = cfg.image_token_id
        ids[:, 1 + n_img] = cfg.vision_end_token_id
    prompt = 2 + n_img + max(1, int(length * (1 - response_fraction)) - 2 - n_img)
    if prompt >= length - 1:
        raise ValueError(f"rows of {length} tokens leave no room for a response after a {prompt}-token prompt")
    lengths = rs.randint(prompt + 2, length + 1, size=batch)
    pos = np.arange(length)[None]
    attention = (pos < lengths[:, None]).astype(np.int32)
    response = ((pos >= prompt) & (pos < lengths[:, None])).astype(np.int32)
    return {"input_ids": np.where(attention > 0, ids, 0), "attention_mask": attention, "loss_mask": response}


def _images(cfg: ModelConfig, rs: np.random.RandomState, batch: int,
            image_grid: tuple[int, int, int] | None) -> dict[str, np.ndarray]:
    if image_grid is None:
        return {}
    n = int(np.prod(image_grid))
    return {"pixel_values": rs.randn(batch * n, cfg.vision.patch_dim).astype(np.float32),
            "image_grid_thw": np.tile(np.asarray(image_grid, np.int64), (batch, 1))}


def random_sft_batch(cfg: ModelConfig, rs: np.random.RandomState, batch: int, length: int,
                     response_fraction: float = 0.5,
                     image_grid: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """An SFT batch of random tokens; with ``image_grid`` every row shows one random image of that grid."""
    return {**_rows(cfg, rs, batch, length, response_fraction, image_grid), **_images(cfg, rs, batch, image_grid)}


def random_dpo_batch(cfg: ModelConfig, rs: np.random.RandomState, batch: int, length: int,
                     response_fraction: float = 0.5,
                     image_grid: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """A DPO batch of ``batch`` pairs: ``2 * batch`` rows, chosen then rejected; a pair shares its prompt
    (and image), the responses differ."""
    chosen = _rows(cfg, rs, batch, length, response_fraction, image_grid)
    rejected = _rows(cfg, rs, batch, length, response_fraction, image_grid)
    prompt = int(chosen["loss_mask"][0].argmax())  # the same prompt length in every row
    rejected["input_ids"][:, :prompt] = chosen["input_ids"][:, :prompt]
    out = {k: np.concatenate([chosen[k], rejected[k]]) for k in chosen}
    images = _images(cfg, rs, batch, image_grid)
    return {**out, **{k: np.concatenate([v, v]) for k, v in images.items()}}


def _process_rows(batch: dict[str, np.ndarray], pairs: bool, count: int, index: int,
                  patches_per_row: int) -> dict[str, np.ndarray]:
    """Process ``index`` of ``count``'s share of a global batch: its ``1/count`` of the rows (of the chosen and
    of the rejected halves, for pairs) and their image patches (``patches_per_row`` each)."""
    n = len(batch["input_ids"])
    blocks = [np.arange(n // 2), np.arange(n // 2, n)] if pairs else [np.arange(n)]
    rows = np.concatenate([np.array_split(b, count)[index] for b in blocks])
    out = {k: v[rows] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in batch:
        patches = (rows[:, None] * patches_per_row + np.arange(patches_per_row)[None]).reshape(-1)
        out.update(pixel_values=batch["pixel_values"][patches], image_grid_thw=batch["image_grid_thw"][rows])
    return out


class SyntheticSource:
    """An endless, resumable iterator of random batches: global batch ``k`` depends only on ``(seed, k)``, or
    on ``(seed, k mod num_batches)`` when ``num_batches > 0`` (1: the same batch every step); process
    ``process`` of ``process_count`` gets its ``batch`` rows of it (its slice of the global batch of
    ``batch * process_count`` rows), so any number of processes sees the rows one process sees.

    ``get_state()`` is ``{"next": k}`` (JSON); ``set_state(state)`` continues from batch ``k`` (grain's
    iterator protocol, as the :mod:`specs_jax.data.pipeline` iterators).
    """

    def __init__(self, cfg: ModelConfig, kind: str, batch: int, length: int, seed: int = 0,
                 response_fraction: float = 0.5, image_grid: tuple[int, int, int] | None = None,
                 num_batches: int = 0, process: int = 0, process_count: int = 1):
        makers = {"sft": random_sft_batch, "preference": random_dpo_batch}
        if kind not in makers:
            raise ValueError(f"synthetic data of kind {kind!r}; expected one of {sorted(makers)} (Algorithm.data)")
        self._make, self.pairs = makers[kind], kind == "preference"
        self.cfg, self.batch, self.length, self.seed = cfg, batch, length, seed
        self.response_fraction, self.image_grid = response_fraction, image_grid
        self.num_batches, self.process, self.process_count = num_batches, process, process_count
        self.next = 0

    def __iter__(self) -> SyntheticSource:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        k = self.next % self.num_batches if self.num_batches else self.next
        rs = np.random.RandomState([self.seed, k])
        self.next += 1
        batch = self._make(self.cfg, rs, self.batch * self.process_count, self.length, self.response_fraction,
                           self.image_grid)
        if self.process_count == 1:
            return batch
        patches = int(np.prod(self.image_grid)) if self.image_grid is not None else 0
        return _process_rows(batch, self.pairs, self.process_count, self.process, patches)

    def get_state(self) -> dict[str, Any]:
        return {"next": self.next}

    def set_state(self, state: dict[str, Any]) -> None:
        self.next = int(state["next"])

    @staticmethod
    def rescale_state(states: list[dict[str, Any]], count: int) -> dict[str, Any]:
        """The position in a job of ``count`` processes: the same global batch (positions do not depend on the
        process count)."""
        return states[0]

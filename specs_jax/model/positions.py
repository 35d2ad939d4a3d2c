"""Host-side (numpy) index computations of Qwen2.5-VL: M-RoPE positions and vision-tower layouts.

These depend on data values (where the image tokens are, the image grid sizes), so they
run on the host before the jitted forward, exactly as the processor/data pipeline would.
They follow transformers' ``Qwen2_5_VLModel.get_rope_index`` and ``vision_utils``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from specs_jax.model.config import ModelConfig


def get_rope_index(
    cfg: ModelConfig,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """3D (t, h, w) rotary positions of a batch of prompts that may contain images.

    Text tokens get running positions ``p, p+1, ...`` on all three streams. The ``n`` tokens of
    an image with merged grid ``(t, h', w')`` (``h' = h / merge``) get ``start + (t_i, h_i, w_i)``,
    and the text after it continues at ``start + max(h', w')``. Padding (``attention_mask == 0``)
    is skipped and gets position 0. Images are consumed from ``image_grid_thw`` in row-major order
    of their tokens across the batch.

    Args:
      input_ids: ``[B, T]`` int.
      image_grid_thw: ``[num_images, 3]`` patch grids (before merging), or None.
      attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding, or None.
    Returns:
      positions ``[3, B, T]`` int32 and rope_deltas ``[B]`` int32 (``max position + 1 - length``),
      the per-row offset that continues positions during decoding.
    """
    input_ids = np.asarray(input_ids)
    b, t = input_ids.shape
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    merge = cfg.vision.spatial_merge_size
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    positions = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b,), np.int64)
    next_image = 0
    for row in range(b):
        ids = input_ids[row][mask[row]]
        is_image = ids == cfg.image_token_id
        pos = np.zeros((3, len(ids)), np.int64)
        cur, i = 0, 0
        while i < len(ids):
            if not is_image[i]:
                j = i
                while j < len(ids) and not is_image[j]:
                    j += 1
                pos[:, i:j] = cur + np.arange(j - i)
                cur += j - i
                i = j
                continue
            if next_image >= len(grids):
                raise ValueError(
                    f"row {row} has more <|image_pad|> runs than image_grid_thw has images ({len(grids)})"
                )
            gt, gh, gw = (int(x) for x in grids[next_image])
            next_image += 1
            lh, lw = gh // merge, gw // merge
            n = gt * lh * lw
            if i + n > len(ids) or not is_image[i:i + n].all():
                raise ValueError(
                    f"row {row}: image {next_image - 1} with grid {(gt, gh, gw)} needs {n} consecutive "
                    f"<|image_pad|> tokens at position {i}, found fewer"
                )
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw), indexing="ij")
            pos[:, i:i + n] = np.stack([tt, hh, ww]).reshape(3, -1) + cur
            cur += max(lh, lw)
            i += n
        positions[:, row, mask[row]] = pos
        deltas[row] = (pos.max() + 1 if len(ids) else 0) - len(ids)
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the prompts hold {next_image}")
    return positions.astype(np.int32), deltas.astype(np.int32)


def image_rows(cfg: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray | None,
               image_grid_thw: np.ndarray) -> np.ndarray:
    """``[I]``: the row of each image of ``image_grid_thw [I, 3]`` (images in row-major order of their attended
    ``<|image_pad|>`` tokens, ``grid.prod() / merge**2`` tokens each)."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    per_row = ((ids == cfg.image_token_id) & mask).sum(1)
    ends = np.cumsum(grid.prod(-1) // cfg.vision.spatial_merge_size**2)
    if len(grid) and ends[-1] != per_row.sum():
        raise ValueError(f"image_grid_thw describes {ends[-1]} image tokens, input_ids hold {per_row.sum()}")
    return np.searchsorted(np.cumsum(per_row), ends, side="left")


def row_patches(cfg: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray | None,
                image_grid_thw: np.ndarray | None) -> np.ndarray:
    """``[B]``: image patches of each row (0 without images); the largest sets the rows' patch budget."""
    if image_grid_thw is None:
        return np.zeros(len(input_ids), np.int64)
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    rows = image_rows(cfg, input_ids, attention_mask, grid)
    return np.bincount(rows, weights=grid.prod(-1), minlength=len(input_ids)).astype(np.int64)


class VisionLayout(NamedTuple):
    """Index arrays that lay out the patches of a list of images for the vision tower.

    All are in the *window order* the tower computes in (patches of one attention window
    contiguous, in groups of ``merge**2``):

    - ``permutation [N]``: patch index (processor order) of each position in window order.
    - ``pos_hw [N, 2]``: (row, col) patch coordinates for the 2D rotary embedding.
    - ``window_segment [N]``: attention-window id (window-attention blocks attend within it).
    - ``image_segment [N]``: image/frame id (full-attention blocks attend within it).
    - ``unpermute [N / merge**2]``: restores processor order of the merged tokens.
    """

    permutation: np.ndarray
    pos_hw: np.ndarray
    window_segment: np.ndarray
    image_segment: np.ndarray
    unpermute: np.ndarray


def vision_layout(cfg: ModelConfig, image_grid_thw: np.ndarray) -> VisionLayout:
    """Compute :class:`VisionLayout` for ``image_grid_thw [num_images, 3]`` (as transformers'
    ``get_vision_position_ids`` + ``get_vision_window_index`` + ``get_vision_cu_seqlens``)."""
    v = cfg.vision
    merge, unit = v.spatial_merge_size, v.spatial_merge_size**2
    win = v.window_size // merge // v.patch_size
    pos_list, win_index, win_seg, img_seg = [], [], [], []
    merged_offset, n_windows, n_frames = 0, 0, 0
    for gt, gh, gw in np.asarray(image_grid_thw).reshape(-1, 3).tolist():
        if gh % merge or gw % merge:
            raise ValueError(f"image grid {(gt, gh, gw)} is not divisible by spatial_merge_size={merge}")
        # patch (h, w) coordinates in processor order: blocks of merge x merge patches.
        hpos, wpos = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        block = (gh // merge, merge, gw // merge, merge)
        hw = np.stack([hpos.reshape(block).transpose(0, 2, 1, 3).ravel(),
                       wpos.reshape(block).transpose(0, 2, 1, 3).ravel()], -1)
        pos_list.append(np.tile(hw, (gt, 1)))
        # window order of the merged tokens, each window of win x win merged tokens.
        lh, lw = gh // merge, gw // merge
        idx = np.arange(gt * lh * lw).reshape(gt, lh, lw)
        ph, pw = -lh % win, -lw % win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = padded.reshape(gt, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(gt, nh * nw, -1)
        for frame in range(gt):
            for w_ in range(nh * nw):
                members = padded[frame, w_][padded[frame, w_] >= 0]
                if len(members):
                    win_index.append(members + merged_offset)
                    win_seg.append(np.full(len(members) * unit, n_windows))
                    n_windows += 1
            img_seg.append(np.full(lh * lw * unit, n_frames))
            n_frames += 1
        merged_offset += gt * lh * lw
    window_index = np.concatenate(win_index)
    permutation = (window_index[:, None] * unit + np.arange(unit)).ravel()
    pos_hw = np.concatenate(pos_list)[permutation]
    return VisionLayout(
        permutation=permutation.astype(np.int32),
        pos_hw=pos_hw.astype(np.int32),
        window_segment=np.concatenate(win_seg).astype(np.int32),
        image_segment=np.concatenate(img_seg).astype(np.int32),
        unpermute=np.argsort(window_index).astype(np.int32),
    )

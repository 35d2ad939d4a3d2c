"""Logit parity of the NNX Qwen2.5-VL with transformers' Qwen2_5_VLForConditionalGeneration."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import specs_jax
from hf_fixtures import IMAGE, hf_logits, image_row, pixels, random_hf_model, tiny_config
from specs_jax.model import from_hf_dict, get_rope_index, vision_layout

FP32_TOL = 1e-4
# bf16 (params and compute) vs transformers in bf16: both round every matmul output to 8 bits of
# mantissa, in different orders, so logits of magnitude ~1 differ by a few bf16 ulps.
BF16_TOL = 0.1


def max_diff(ours, ref, mask=None) -> float:
    diff = np.abs(np.asarray(ours, np.float32) - ref)
    if mask is not None:
        diff = diff[np.asarray(mask, bool)]
    return float(diff.max())


@pytest.fixture(scope="module")
def loaded(hf_model_dir):
    path, hf = hf_model_dir
    return specs_jax.load_model(path), hf


def test_text_only(loaded):
    model, hf = loaded
    ids = np.random.RandomState(0).randint(3, 290, (2, 11))
    diff = max_diff(model(ids), hf_logits(hf, ids))
    print(f"text-only max abs diff {diff:.2e}")
    assert diff <= FP32_TOL


def test_one_image(loaded):
    model, hf = loaded
    grids = [(1, 8, 12)]
    ids = np.array([image_row(grids, [[5, 6], [7, 8, 9]])])
    pix = pixels(grids)
    diff = max_diff(model(ids, pixel_values=pix, image_grid_thw=np.array(grids)), hf_logits(hf, ids, None, pix, grids))
    print(f"one-image max abs diff {diff:.2e}")
    assert diff <= FP32_TOL


def test_two_images_of_different_sizes_in_one_row(loaded):
    model, hf = loaded
    grids = [(1, 8, 12), (1, 6, 4)]
    ids = np.array([image_row(grids, [[5, 6], [7, 8, 10], [11]])])
    pix = pixels(grids)
    diff = max_diff(model(ids, pixel_values=pix, image_grid_thw=np.array(grids)), hf_logits(hf, ids, None, pix, grids))
    print(f"two-image max abs diff {diff:.2e}")
    assert diff <= FP32_TOL


def _mixed_batch(side: str):
    """Rows: two images; text only; one image — padded to one length on ``side``."""
    grids_by_row = [[(1, 4, 8), (1, 6, 6)], [], [(1, 10, 4)]]
    rows = [image_row(grids_by_row[0], [[5], [6, 7], [8, 9, 10]]), list(range(20, 41)),
            image_row(grids_by_row[2], [[11, 12, 13], [14]])]
    length = max(map(len, rows))
    ids = np.zeros((3, length), np.int64)
    mask = np.zeros((3, length), np.int64)
    for i, row in enumerate(rows):
        sl = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = row, 1
    grids = [g for row in grids_by_row for g in row]
    return ids, mask, grids


def _mixed_batch_diff(model, hf, side: str) -> float:
    """Largest |logit difference| with transformers over the real tokens of :func:`_mixed_batch`."""
    ids, mask, grids = _mixed_batch(side)
    pix = pixels(grids)
    ours = model(ids, attention_mask=mask, pixel_values=pix, image_grid_thw=np.array(grids))
    return max_diff(ours, hf_logits(hf, ids, mask, pix, grids), mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_mixing_image_and_text_rows_with_padding(loaded, side):
    model, hf = loaded
    diff = _mixed_batch_diff(model, hf, side)
    print(f"mixed batch ({side} padding) max abs diff {diff:.2e}")
    assert diff <= FP32_TOL


def test_rope_index_matches_transformers(loaded):
    model, hf = loaded
    ids, mask, grids = _mixed_batch("left")
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    pos, delta = get_rope_index(model.config, ids, np.array(grids), mask)
    m = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, m], ref_pos.numpy()[:, m])
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])


@pytest.mark.parametrize("grids", [[(1, 8, 12)], [(1, 4, 4), (1, 10, 6), (2, 4, 8)]])
def test_vision_layout_matches_transformers(grids):
    cfg = from_hf_dict(tiny_config().to_dict())
    grid_t = torch.tensor(grids)
    layout = vision_layout(cfg, np.array(grids))
    window_index, cu_window = get_vision_window_index(grid_t, spatial_merge_size=2, window_size=56, patch_size=14)
    np.testing.assert_array_equal(np.argsort(window_index.numpy()), layout.unpermute)
    np.testing.assert_array_equal(get_vision_position_ids(grid_t, 2).numpy()[layout.permutation], layout.pos_hw)
    for seg, cu in ((layout.window_segment, cu_window), (layout.image_segment, get_vision_cu_seqlens(grid_t))):
        boundaries = np.flatnonzero(np.diff(seg)) + 1
        np.testing.assert_array_equal(np.r_[0, boundaries, len(seg)], cu.numpy())


def test_bf16_within_documented_tolerance(hf_model_dir):
    path, _ = hf_model_dir
    hf16 = random_hf_model(tiny_config(tie=hf_model_dir[1].config.tie_word_embeddings)).to(torch.bfloat16)
    model = specs_jax.load_model(path, dtype="bfloat16")
    grids = [(1, 8, 12)]
    ids = np.array([image_row(grids, [[5, 6], [7, 8, 9]])])
    pix = pixels(grids)
    ours = model(ids, pixel_values=pix, image_grid_thw=np.array(grids))
    assert ours.dtype == jax.numpy.bfloat16
    ref = hf_logits(hf16, ids, None, pix.astype(np.float32), grids)
    diff = max_diff(ours, ref)
    print(f"bf16 max abs diff {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= BF16_TOL


def test_fp32_master_weights_with_bf16_compute(hf_model_dir):
    path, hf = hf_model_dir
    model = specs_jax.load_model(path, dtype="bfloat16", param_dtype="float32")
    params = jax.tree.leaves(jax.tree.map(lambda x: x.dtype, specs_jax.convert.io.model_params(model)))
    assert set(params) == {np.dtype(np.float32)}
    ids = np.random.RandomState(0).randint(3, 290, (1, 9))
    assert max_diff(model(ids), hf_logits(hf, ids)) <= BF16_TOL


def test_sequence_tiled_mlp_matches_transformers(hf_model_dir):
    """mlp_tile=4 over rows of 11 tokens (three tiles, the last one padded), with an image."""
    path, hf = hf_model_dir
    model = specs_jax.load_model(path, mlp_tile=4)
    grids = [(1, 8, 12)]
    ids = np.array([image_row(grids, [[5, 6], [7, 8, 9]])])
    pix = pixels(grids)
    diff = max_diff(model(ids, pixel_values=pix, image_grid_thw=np.array(grids)), hf_logits(hf, ids, None, pix, grids))
    assert diff <= FP32_TOL


def test_layers_are_scanned_so_program_size_does_not_grow_with_depth():
    from flax import nnx

    from specs_jax.model import Qwen2_5_VLForConditionalGeneration, prepare_inputs

    def n_equations(layers: int) -> int:
        cfg = from_hf_dict(tiny_config(num_hidden_layers=layers).to_dict())
        model = Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        inputs = prepare_inputs(cfg, np.ones((1, 6), np.int32))
        return len(jax.make_jaxpr(lambda m, x: m.forward(x))(model, inputs).eqns)

    assert n_equations(2) == n_equations(8)


def test_image_token_count_mismatch_is_refused(loaded):
    model, _ = loaded
    grids = [(1, 8, 12)]
    ids = np.array([image_row(grids, [[5], [6]])])[:, :-3]  # lose a few image tokens
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixel_values=pixels(grids), image_grid_thw=np.array(grids))


def test_per_row_patch_budget_leaves_logits_unchanged(loaded):
    """Each row's images sit in its own row of VisionInputs, padded to the row budget; padding patches are
    never seen by real ones nor scattered into the tokens. One vision row per batch row (the sharded layout)
    and vision rows only for the rows that show images (the default) give the same logits."""
    from specs_jax.model import prepare_inputs

    model, hf = loaded
    ids, mask, grids = _mixed_batch("right")  # rows with 2, 0 and 1 images: 68, 0 and 40 patches
    pix = pixels(grids)
    per_row = prepare_inputs(model.config, ids, mask, pix, np.array(grids), image_rows_only=False)
    assert per_row.vision.pixel_values.shape == (3, 68, pix.shape[1]) and per_row.vision.feature_rows is None
    np.testing.assert_array_equal(per_row.vision.pixel_values[2, :40], pix[68:])  # row 2's image, in its row
    assert not per_row.vision.pixel_values[1].any() and (per_row.vision.image_segment[1] == -1).all()
    compact = prepare_inputs(model.config, ids, mask, pix, np.array(grids))
    assert compact.vision.pixel_values.shape == (2, 68, pix.shape[1])  # row 1 shows no image: no vision row
    np.testing.assert_array_equal(compact.vision.pixel_values[1, :40], pix[68:])  # row 2's image, vision row 1
    np.testing.assert_array_equal(compact.vision.feature_rows, [0, 0, 1])
    padded = prepare_inputs(model.config, ids, mask, pix, np.array(grids), patch_bucket=128, image_rows_only=False)
    assert padded.vision.pixel_values.shape == (3, 128, pix.shape[1])
    ours = np.asarray(model.forward(padded))
    np.testing.assert_allclose(ours, np.asarray(model.forward(per_row)), atol=1e-5)
    np.testing.assert_allclose(ours, np.asarray(model.forward(compact)), atol=1e-5)
    assert max_diff(ours, hf_logits(hf, ids, mask, pix, grids), mask) <= FP32_TOL
    with pytest.raises(ValueError, match="patch_bucket 64 must be >= the largest row's 68"):
        prepare_inputs(model.config, ids, mask, pix, np.array(grids), patch_bucket=64)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend, blocks", [("xla", None), ("blockwise", None), ("blockwise", 16), ("splash", None)],
                         ids=["xla", "blockwise", "blockwise-16", "splash-interpret"])
def test_attention_backends_match_transformers(hf_model_dir, backend, blocks, side, monkeypatch):
    """Logits of every CPU-runnable attention backend equal transformers' on a padded batch mixing rows
    with and without images (``blockwise-16``: 16-token blocks, so many block pairs and block skipping
    in the decoder and the vision tower; ``splash``: the Pallas TPU kernel in interpret mode)."""
    from specs_jax.model import attention_blockwise

    if blocks is not None:
        monkeypatch.setattr(attention_blockwise, "BLOCK_Q", blocks)
        monkeypatch.setattr(attention_blockwise, "BLOCK_KV", blocks)
    path, hf = hf_model_dir
    model = specs_jax.load_model(path, attention=backend)
    diff = _mixed_batch_diff(model, hf, side)
    print(f"attention={backend} blocks={blocks} ({side} padding) max abs diff {diff:.2e}")
    assert diff <= FP32_TOL


def test_image_rows_only_layout_has_the_per_row_gradients(loaded):
    """The default layout (vision rows only for the rows that show images, read back through
    ``feature_rows``) differentiates to the same parameter gradients as one vision row per batch row."""
    from flax import nnx

    from specs_jax.model import prepare_inputs

    model, _ = loaded
    ids, mask, grids = _mixed_batch("left")
    pix = pixels(grids)

    def grads(image_rows_only):
        inputs = prepare_inputs(model.config, ids, mask, pix, np.array(grids), image_rows_only=image_rows_only)
        loss = lambda m: (m.forward(inputs) * mask[..., None]).std()
        return nnx.state(nnx.grad(loss)(model), nnx.Param)

    compact, per_row = grads(True), grads(False)
    visual = compact["model"]["visual"]["merger"]["mlp"][2]["weight"][...]
    assert np.abs(np.asarray(visual)).max() > 0  # the image features are differentiated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), compact, per_row)

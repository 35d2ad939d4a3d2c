"""The rollout sampler: greedy parity with transformers' generate, log-probs, sampling filters, stops, compiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import specs_jax
from hf_fixtures import IMAGE, image_row, pixels, random_hf_model, tiny_config
from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams, filter_logits

EOS, PAD = 2, 0
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = random_hf_model(tiny_config(), seed=3)
    path = tmp_path_factory.mktemp("sampler_model")
    hf.save_pretrained(path)
    return specs_jax.load_model(path), hf


def sampler(model, max_new_tokens=10, **kw) -> Sampler:
    return Sampler(model, None, SamplerConfig(max_new_tokens=max_new_tokens, **kw), eos_ids=[EOS], pad_id=PAD)


def left_pad(rows):
    length = max(map(len, rows))
    ids, mask = np.full((len(rows), length), PAD), np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    return ids, mask


def hf_greedy(hf, ids, mask=None, pix=None, grids=None, max_new_tokens=10):
    kw = dict(input_ids=torch.tensor(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD,
              eos_token_id=EOS)
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if pix is not None:
        kw.update(pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(np.array(grids)),
                  mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))
    with torch.no_grad():
        out = hf.generate(**kw)[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=PAD)


def test_greedy_equals_transformers_text_left_padded_batch(models):
    model, hf = models
    ids, mask = left_pad([list(range(10, 19)), [40, 41, 42], list(range(60, 66))])
    ours = sampler(model).generate_ids(ids, mask, params=GREEDY, decode=False)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf, ids, mask))


@pytest.mark.parametrize("grids", [[(1, 8, 12)], [(1, 8, 12), (1, 4, 6)]], ids=["one-image", "two-images"])
def test_greedy_equals_transformers_with_images(models, grids):
    model, hf = models
    ids = np.array([image_row(grids, [[5, 6], *([[7, 8]] * (len(grids) - 1)), [9, 10, 11]])])
    pix = pixels(grids)
    ours = sampler(model).generate_ids(ids, None, pix, np.array(grids), params=GREEDY, decode=False)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf, ids, None, pix, grids))


def test_greedy_equals_transformers_mixed_image_and_text_rows(models):
    model, hf = models
    grids = [(1, 4, 8)]
    ids, mask = left_pad([image_row(grids, [[5], [6, 7, 8]]), list(range(20, 26))])
    pix = pixels(grids)
    ours = sampler(model).generate_ids(ids, mask, pix, np.array(grids), params=GREEDY, decode=False)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf, ids, mask, pix, grids))


@pytest.mark.parametrize("backend, blocks", [("xla", None), ("blockwise", 8)], ids=["xla", "blockwise-8"])
def test_attention_backends_of_the_sampler_equal_transformers(models, backend, blocks, monkeypatch):
    """Prefill into the cache and the cached decode steps (``kv_lengths``) through the attention
    interface: the XLA reference and the blockwise kernel with 8-token blocks (many blocks, skipped
    cache slots) sample transformers' greedy tokens, with the same log-probs."""
    from specs_jax.model import attention_blockwise

    if blocks is not None:
        monkeypatch.setattr(attention_blockwise, "BLOCK_Q", blocks)
        monkeypatch.setattr(attention_blockwise, "BLOCK_KV", blocks)
    model, hf = models
    grids = [(1, 4, 8)]
    ids, mask = left_pad([image_row(grids, [[5], [6, 7, 8]]), list(range(20, 26))])
    pix = pixels(grids)
    ours = sampler(model, attention=backend).generate_ids(ids, mask, pix, np.array(grids), params=GREEDY,
                                                         decode=False)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf, ids, mask, pix, grids))
    reference = sampler(model, attention="xla").generate_ids(ids, mask, pix, np.array(grids), params=GREEDY,
                                                             decode=False)
    np.testing.assert_allclose(ours.logps, reference.logps, atol=1e-5)


def completion_logps(model, prompt_ids, prompt_mask, tokens, mask, temperature, pix=None, grids=None):
    """log softmax(logits / T) of each completion token, from one full forward of prompt + completion."""
    ids = np.concatenate([prompt_ids, tokens], 1)
    full_mask = np.concatenate([prompt_mask, mask], 1)
    logits = np.asarray(model(ids, full_mask, pix, grids), np.float64) / temperature
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    t = prompt_ids.shape[1]
    return np.take_along_axis(logp[:, t - 1:-1], tokens[..., None], -1)[..., 0]


def test_logps_equal_a_full_forward_of_prompt_plus_completion(models):
    model, _ = models
    grids = [(1, 8, 8)]
    ids, mask = left_pad([image_row(grids, [[5], [6, 7]]), list(range(20, 30))])
    pix = pixels(grids)
    params = SamplingParams(temperature=0.7)
    out = sampler(model, 8).generate_ids(ids, mask, pix, np.array(grids), n=2, params=params, seed=1, decode=False)
    assert out.tokens.shape[0] == 4  # rows: prompt 0 x 2 samples (each with the image), prompt 1 x 2
    ref = completion_logps(model, out.prompt_ids, out.prompt_mask, out.tokens, out.mask.astype(np.int64), 0.7,
                           np.concatenate([pix, pix]), np.array(grids * 2))
    np.testing.assert_allclose(out.logps[out.mask], ref[out.mask], atol=1e-4)


def test_top_k_and_top_p_never_emit_excluded_tokens(models):
    model, _ = models
    ids, mask = left_pad([list(range(10, 19)), list(range(40, 44))])
    for params in (SamplingParams(temperature=1.5, top_k=3), SamplingParams(temperature=1.5, top_p=0.5)):
        out = sampler(model, 6).generate_ids(ids, mask, n=8, params=params, seed=7, decode=False)
        full = np.concatenate([out.prompt_ids, out.tokens], 1)
        logits = np.asarray(model(full, np.concatenate([out.prompt_mask, out.mask], 1)), np.float64) / 1.5
        t = out.prompt_ids.shape[1]
        step_logits = logits[:, t - 1:-1]
        step_logits[..., [IMAGE, model.config.video_token_id]] = -np.inf  # never sampled (vision placeholders)
        probs = np.exp(step_logits - step_logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, -1)
        rank = np.argsort(order, -1)
        tok_rank = np.take_along_axis(rank, out.tokens[..., None], -1)[..., 0]
        if params.top_k:
            allowed = tok_rank < params.top_k
        else:  # allowed iff the mass of strictly more likely tokens is below p
            sorted_p = np.take_along_axis(probs, order, -1)
            before = np.cumsum(sorted_p, -1) - sorted_p
            allowed = np.take_along_axis(before, tok_rank[..., None], -1)[..., 0] < params.top_p + 1e-6
        assert allowed[out.mask].all(), params
        assert len({tuple(r) for r in out.tokens}) > 1  # it does sample


def test_vision_placeholders_are_never_sampled(models):
    model, _ = models
    ids, mask = left_pad([list(range(10, 19))])
    banned = np.array([IMAGE, model.config.video_token_id])
    head = model.lm_head.weight[...]
    # point the placeholders' LM-head rows along the prompt's last hidden state: they become the argmax
    from specs_jax.model import prepare_inputs

    hidden = np.asarray(model.hidden_states(prepare_inputs(model.config, ids, mask)))[0, -1]
    model.lm_head.weight.set_value(head.at[banned].set(np.tile(hidden * 10.0, (2, 1))))
    try:
        assert np.asarray(model(ids, mask))[0, -1].argmax() in banned  # precondition: they would win
        greedy = sampler(model, 6).generate_ids(ids, mask, params=GREEDY, decode=False)
        sampled = sampler(model, 6).generate_ids(ids, mask, n=8, params=SamplingParams(temperature=1.0), seed=0,
                                                 decode=False)
    finally:
        model.lm_head.weight.set_value(head)
    for out in (greedy, sampled):
        assert not np.isin(out.tokens[out.mask], banned).any()


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.asarray(filter_logits(jax.numpy.asarray(logits), SamplingParams(min_p=0.1)))
    np.testing.assert_array_equal(np.isfinite(out), p >= 0.1 * p.max(-1, keepdims=True))
    out = np.asarray(filter_logits(jax.numpy.asarray(logits), SamplingParams(top_k=5)))
    assert (np.isfinite(out).sum(-1) == 5).all()
    np.testing.assert_array_equal(np.isfinite(out), logits >= np.sort(logits, -1)[:, -5:-4])


def test_seeded_sampling_is_reproducible_and_temperature_zero_is_greedy(models):
    model, _ = models
    ids, mask = left_pad([list(range(10, 19))])
    s = sampler(model, 8)
    a = s.generate_ids(ids, mask, n=4, params=SamplingParams(temperature=1.0), seed=5, decode=False)
    b = s.generate_ids(ids, mask, n=4, params=SamplingParams(temperature=1.0), seed=5, decode=False)
    c = s.generate_ids(ids, mask, n=4, params=SamplingParams(temperature=1.0), seed=6, decode=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    g = s.generate_ids(ids, mask, n=2, params=GREEDY, decode=False)
    full_mask = np.concatenate([g.prompt_mask, g.mask], 1)
    logits = np.asarray(model(np.concatenate([g.prompt_ids, g.tokens], 1), full_mask))[:, g.prompt_ids.shape[1] - 1:-1]
    np.testing.assert_array_equal(g.tokens[g.mask], logits.argmax(-1)[g.mask])


def test_eos_per_row_and_padding_after_it(models):
    model, _ = models
    ids, mask = left_pad([list(range(10, 19)), list(range(40, 44))])
    free = sampler(model, 10).generate_ids(ids, mask, params=GREEDY, decode=False)
    stop_token = int(free.tokens[0, 3])  # make row 0's 4th greedy token an EOS
    s = Sampler(model, None, SamplerConfig(max_new_tokens=10), eos_ids=[stop_token], pad_id=PAD)
    out = s.generate_ids(ids, mask, params=GREEDY, decode=False)
    for row in range(2):
        hits = np.flatnonzero(free.tokens[row] == stop_token)
        end = hits[0] + 1 if len(hits) else 10
        np.testing.assert_array_equal(out.mask[row], np.arange(10) < end)
        np.testing.assert_array_equal(out.tokens[row, :end], free.tokens[row, :end])
        assert (out.tokens[row, end:] == PAD).all() and (out.logps[row, end:] == 0).all()


class CharTokenizer:
    """Decodes token id i as chr(ord('a') + i % 26): enough to test stop-string handling."""

    eos_token_id = EOS
    pad_token_id = PAD

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_truncate_text_and_mask(models):
    model, _ = models
    ids, mask = left_pad([list(range(10, 19))])
    s = Sampler(model, CharTokenizer(), SamplerConfig(max_new_tokens=10), eos_ids=[EOS], pad_id=PAD)
    free = s.generate_ids(ids, mask, params=GREEDY)
    stop = free.texts[0][3:5]
    out = s.generate_ids(ids, mask, params=GREEDY, stop=[stop])
    cut = free.texts[0].find(stop) + len(stop)
    assert out.texts[0] == free.texts[0][:cut]
    assert out.mask[0].sum() == cut  # one character per token


def test_compile_count_is_constant_across_batches_within_a_bucket(models):
    model, _ = models
    s = sampler(model, 4, prompt_buckets=(16, 32), batch_buckets=(4, 8))
    rng = np.random.default_rng(0)
    for i in range(20):
        rows = [list(rng.integers(3, 290, rng.integers(3, 16))) for _ in range(rng.integers(1, 5))]
        s.generate_ids(*left_pad(rows), params=GREEDY, decode=False)
    assert s.compilations == 1
    s.generate_ids(*left_pad([list(range(3, 25))]), params=GREEDY, decode=False)  # next prompt bucket
    assert s.compilations == 2


def test_top_probs_for_rbf(models):
    model, _ = models
    ids, mask = left_pad([list(range(10, 19))])
    out = sampler(model, 5, top_probs=4).generate_ids(ids, mask, params=SamplingParams(temperature=1.0), decode=False)
    assert out.top_probs.shape == (1, 5, 4)
    assert (np.diff(out.top_probs, axis=-1) <= 0).all() and (out.top_probs.sum(-1) <= 1 + 1e-6).all()

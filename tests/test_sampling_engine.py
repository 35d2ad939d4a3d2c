"""The rollout engine: continuous batching equals static batching, the KV-cache budget, per-prompt caps."""

from __future__ import annotations

import jax
import jax.extend
import numpy as np
import pytest

import specs_jax
from hf_fixtures import image_row, pixels, random_hf_model, tiny_config
from test_sampling import left_pad
from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_model")
    random_hf_model(tiny_config(), seed=3).save_pretrained(path)
    return specs_jax.load_model(path)


def sampler(model, **kw) -> Sampler:
    return Sampler(model, None, SamplerConfig(max_new_tokens=9, **kw), eos_ids=[EOS], pad_id=PAD)


GRIDS = [(1, 4, 8), (1, 4, 4)]


def batch():
    """Three prompts (two with an image), left-padded, with their patches."""
    rows = [image_row(GRIDS[:1], [[5], [6, 7, 8]]), list(range(20, 31)), image_row(GRIDS[1:], [[9, 10], [11]])]
    ids, mask = left_pad(rows)
    return ids, mask, np.concatenate([pixels(GRIDS[:1]), pixels(GRIDS[1:], seed=2)]), np.array(GRIDS)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=50)],
                         ids=["greedy", "seeded"])
def test_continuous_batching_equals_static_batching(model, params):
    ids, mask, pix, grids = batch()
    caps = [3, 9, 5]  # rows end at different steps, so freed slots take pending samples
    args = dict(n=3, params=params, seed=7, decode=False, max_tokens=caps)
    static = sampler(model).generate_ids(ids, mask, pix, grids, **args)  # 9 samples -> 9+ slots: no refill
    lengths = static.mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and (lengths <= np.repeat(caps, 3)).all()
    for slots in (1, 2, 4):
        s = sampler(model, max_slots=slots)
        assert s.slots(9, ids.shape[1]) == slots
        out = s.generate_ids(ids, mask, pix, grids, **args)
        np.testing.assert_array_equal(out.tokens, static.tokens)
        np.testing.assert_array_equal(out.mask, static.mask)
        np.testing.assert_allclose(out.logps, static.logps, atol=1e-5)


def test_samples_of_a_prompt_differ_and_do_not_depend_on_the_batch(model):
    ids, mask = left_pad([list(range(10, 19)), list(range(40, 47))])
    params = SamplingParams(temperature=1.0)
    both = sampler(model).generate_ids(ids, mask, n=2, params=params, seed=3, decode=False)
    assert not np.array_equal(both.tokens[0], both.tokens[1])  # the n samples get their own streams
    first = sampler(model).generate_ids(ids[:1], mask[:1], n=2, params=params, seed=3, decode=False)
    np.testing.assert_array_equal(first.tokens, both.tokens[:2])  # prompt 0's stream: (seed, 0, sample, step)


def kv_bytes_per_token(model) -> int:
    """2 (k and v) x layers x kv heads x head dim x bytes of the cache dtype, from the HF config."""
    text = model.config.hf_config.get("text_config") or model.config.hf_config
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * np.dtype(model.config.dtype).itemsize


def cache_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every 5-D value ``[layers, rows, length, kv_heads, head_dim]`` of a (nested) jaxpr."""
    out = set()
    for eqn in jaxpr.eqns:
        out |= {var.aval.shape for var in eqn.outvars if getattr(var.aval, "ndim", 0) == 5}
    for sub in jax.extend.core.subjaxprs(jaxpr):
        out |= cache_shapes(sub)
    return out


def test_slots_follow_the_kv_cache_budget_and_the_traced_cache_fits_it(model):
    per_token = kv_bytes_per_token(model)
    ids, mask = left_pad([list(range(10, 19)), list(range(40, 47))])
    t, m = 32, 9  # prompt bucket, max_new_tokens
    budget = 3.5 * (t + m) * per_token / 2**30  # room for 3 slots
    s = sampler(model, kv_cache_gib=budget)
    assert s.slots(8, t) == 3
    assert s.slots(2, t) == 2
    assert sampler(model, kv_cache_gib=budget, max_slots=2).slots(8, t) == 2
    out = s.generate_ids(ids, mask, n=4, params=SamplingParams(temperature=1.0), seed=1, decode=False)
    ref = sampler(model).generate_ids(ids, mask, n=4, params=SamplingParams(temperature=1.0), seed=1, decode=False)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    # the decode cache of the traced program holds exactly 3 slots of t + m tokens
    inputs, _ = s._pad_batch(ids, mask, None, None)
    state = specs_jax.sampling.sampler.nnx.state(model)
    jaxpr = jax.make_jaxpr(lambda st, x: s._jitted(st, x, jax.random.key(0), np.int32(8), np.full(8, m, np.int32),
                                            max_new_tokens=m, n=4, slots=3, params=SamplingParams(), top_probs=0))(
        state, inputs)
    decode = {shape for shape in cache_shapes(jaxpr.jaxpr) if shape[2] == t + m}
    assert decode and all(shape[1] == 3 for shape in decode)
    assert 3 * (t + m) * per_token <= budget * 2**30


def test_a_prompt_too_long_for_the_budget_is_refused_before_any_work(model):
    per_token = kv_bytes_per_token(model)
    s = sampler(model, kv_cache_gib=40 * per_token / 2**30)  # 40 tokens: less than a 32-token bucket + 9
    ids, mask = left_pad([list(range(10, 30))])
    with pytest.raises(ValueError, match="needs .* GiB of KV cache, over the budget kv_cache_gib"):
        s.generate_ids(ids, mask, decode=False)
    assert s.compilations == 0


def test_bad_caps_and_budgets_are_refused(model):
    ids, mask = left_pad([list(range(10, 19)), list(range(40, 47))])
    with pytest.raises(ValueError, match="max_tokens must hold one cap"):
        sampler(model).generate_ids(ids, mask, max_tokens=[3], decode=False)
    with pytest.raises(ValueError, match="max_tokens must hold one cap"):
        sampler(model).generate_ids(ids, mask, max_tokens=[3, 10], decode=False)
    with pytest.raises(ValueError, match="max_slots must be >= 1"):
        SamplerConfig(max_slots=0)
    with pytest.raises(ValueError, match="kv_cache_gib must be > 0"):
        SamplerConfig(kv_cache_gib=0)

"""GRPO building blocks: rollout -> sequences with aligned old log-probs -> jitted update that learns."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import specs_jax
from hf_fixtures import image_row, pixels, random_hf_model, tiny_config
from specs_jax.losses import get_loss
from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams
from specs_jax.training.batches import prepare_grpo
from specs_jax.training.grpo import grpo_spec, rollout, rollout_sequences
from specs_jax.training.sharding import make_mesh, make_rules
from specs_jax.training.state import create_state, join_params, state_shardings
from specs_jax.training.steps import batch_shardings, make_train_step, sequence_logps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo_model")
    random_hf_model(tiny_config(), seed=5).save_pretrained(path)
    return specs_jax.load_model(path)


def prompt_batch(with_image: bool):
    grids = [(1, 4, 4)]
    rows = [image_row(grids, [[5], [6, 7]]) if with_image else list(range(10, 18)), list(range(30, 36))]
    length = max(map(len, rows))
    ids, mask = np.zeros((2, length), np.int32), np.zeros((2, length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    batch = {"input_ids": ids, "attention_mask": mask, "answer": ["3", "4"]}
    if with_image:
        batch.update(pixel_values=pixels(grids), image_grid_thw=np.array(grids))
    return batch


def even_token_share(gen, answers):
    """Toy verifiable reward: the share of even token ids in each completion."""
    return (np.where(gen.mask, gen.tokens % 2 == 0, 0).sum(1) / np.maximum(gen.mask.sum(1), 1)).astype(np.float32)


@pytest.mark.parametrize("with_image,accum", [(True, 1), (False, 2)])
def test_old_logps_are_aligned_with_the_training_forward(model, with_image, accum):
    sampler = Sampler(model, None, SamplerConfig(max_new_tokens=5), eos_ids=[2], pad_id=0)
    batch = prompt_batch(with_image)
    ro = rollout(sampler, batch, group_size=2, params=SamplingParams(temperature=0.9), seed=3,
                 reward_fn=even_token_share)
    assert ro.advantages.shape == (4,)
    seqs = rollout_sequences(model.config, batch, ro, group_size=2)
    if with_image:
        assert len(seqs["image_grid_thw"]) == 2  # prompt 0's image, once per sample
    prepared = prepare_grpo(model.config, seqs, accum)
    assert prepared.mask.sum() == ro.generation.mask.sum()
    for a in range(accum):
        micro = jax.tree.map(lambda x: x[a], prepared)
        logps = np.asarray(sequence_logps(model, micro, temperature=0.9))
        m = micro.mask > 0
        np.testing.assert_allclose(logps[m], micro.rows["old_logps"][m], atol=1e-4)


def test_grpo_steps_raise_the_rewarded_behaviour(model):
    graphdef = nnx.graphdef(model)
    mesh = make_mesh(1, 1, 1)
    tx = optax.adam(5e-2)
    shardings = state_shardings(model, tx, False, mesh, make_rules())
    state = create_state(model, tx, shardings, False, seed=0)
    spec = grpo_spec(graphdef, get_loss("grpo"), temperature=1.0, kl_coef=0.0)
    sampler = Sampler(model, None, SamplerConfig(max_new_tokens=4), eos_ids=[2], pad_id=0)
    batch = prompt_batch(with_image=False)
    params = SamplingParams(temperature=1.0)

    def mean_reward(weights) -> float:
        ro = rollout(sampler, batch, group_size=64, params=params, seed=123, weights=weights,
                     reward_fn=even_token_share)
        return float(ro.rewards.mean())

    before = mean_reward(None)
    step_fn = None
    for step in range(8):
        weights = join_params(state.params, state.frozen)
        ro = rollout(sampler, batch, group_size=8, params=params, seed=step, weights=weights,
                     reward_fn=even_token_share)
        prepared = prepare_grpo(model.config, rollout_sequences(model.config, batch, ro, 8), 1)
        sh = batch_shardings(prepared, mesh)
        if step_fn is None:
            step_fn = make_train_step(graphdef, spec, tx, optax.constant_schedule(5e-2), shardings, sh)
        state, metrics = step_fn(state, jax.device_put(prepared, sh), None)
        assert abs(float(metrics["ratio"]) - 1.0) < 1e-3  # one update per rollout: on-policy
    after = mean_reward(join_params(state.params, state.frozen))
    print(f"mean reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.1

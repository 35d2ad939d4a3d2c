"""GRPO (METHOD.md section 4) on the step machinery: rollout -> rewards -> advantages -> update.

One RL step, for a left-padded prompt batch (``specs_jax.data.pipeline.rl_batches``):

1. :func:`rollout`: ``group_size`` samples per prompt with :class:`~specs_jax.sampling.Sampler`,
   from the trainer's current weights, scored by a reward function of (texts, answers)
   (default: the SPECS reward, ``format + accuracy``), advantages from
   :func:`~specs_jax.losses.group_advantages`;
2. :func:`rollout_sequences`: prompt + completion rows, a completion-only ``loss_mask``, the
   sampler's log-probs (under ``softmax(logits / T)``) as old log-probs aligned with the labels, and
   each prompt's images repeated for its samples;
3. :func:`~specs_jax.training.batches.prepare_grpo` + ``make_train_step(graphdef, grpo_spec(...))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specs_jax.losses import group_advantages
from specs_jax.model import ModelConfig
from specs_jax.rewards import score_batch
from specs_jax.sampling import Generation, Sampler, SamplingParams
from specs_jax.training.batches import SeqBatch, select_images
from specs_jax.training.state import model_from_params
from specs_jax.training.steps import LossSpec, StepContext, checked_loss, sequence_logps

__all__ = ["ScoredRollout", "grpo_spec", "rollout", "rollout_sequences", "specs_rewards"]

RewardFn = Callable[[Generation, Sequence[str]], np.ndarray]


def specs_rewards(gen: Generation, answers: Sequence[str]) -> np.ndarray:
    """SPECS reward ``R = R_format (0.5) + R_acc (1.0)`` of each decoded response, ``[R]`` float32."""
    return score_batch(gen.texts, answers).total


class ScoredRollout(NamedTuple):
    """A sampler generation with its rewards and group advantages (rows prompt-major)."""

    generation: Generation
    rewards: np.ndarray  # [R]
    advantages: np.ndarray  # [R]


def rollout(sampler: Sampler, batch: Mapping[str, Any], *, group_size: int, params: SamplingParams,
            seed: int, weights: dict | None = None, reward_fn: RewardFn = specs_rewards,
            scale: str = "group") -> ScoredRollout:
    """Sample ``group_size`` completions per prompt of ``batch`` (``input_ids``, ``attention_mask``,
    optional ``pixel_values``/``image_grid_thw``, ``answer``), score them with
    ``reward_fn(generation, answers)``, compute advantages. ``weights``: the current policy params."""
    gen = sampler.generate_ids(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                               batch.get("image_grid_thw"), n=group_size, params=params, seed=seed, weights=weights)
    answers = [a for a in batch["answer"] for _ in range(group_size)]
    rewards = np.asarray(reward_fn(gen, answers), np.float32)
    advantages = np.asarray(group_advantages(jnp.asarray(rewards), group_size, scale=scale))
    return ScoredRollout(gen, rewards, advantages)


def rollout_sequences(cfg: ModelConfig, batch: Mapping[str, Any], ro: ScoredRollout, group_size: int) -> dict:
    """The GRPO batch dict of a rollout (rows ordered prompt-major, as the sampler returns them).

    Completion token ``j`` sits at position ``Tp + j`` (``Tp``: padded prompt length), so its
    log-prob is the label at position ``Tp + j - 1``: ``old_logps[:, Tp - 1 + j] = logps[:, j]``.
    """
    gen = ro.generation
    tp = gen.prompt_ids.shape[1]
    out = {
        "input_ids": np.concatenate([gen.prompt_ids, gen.tokens], 1),
        "attention_mask": np.concatenate([gen.prompt_mask, gen.mask], 1),
        "loss_mask": np.concatenate([np.zeros_like(gen.prompt_mask), gen.mask], 1),
        "advantages": ro.advantages,
    }
    old = np.zeros(out["input_ids"].shape, np.float32)
    old[:, tp - 1: tp - 1 + gen.tokens.shape[1]] = np.where(gen.mask, gen.logps, 0.0)
    out["old_logps"] = old
    samples = np.repeat(np.arange(len(batch["input_ids"])), group_size)
    out["pixel_values"], out["image_grid_thw"] = select_images(cfg, batch, samples)
    return out


def grpo_spec(graphdef: nnx.GraphDef, temperature: float = 1.0, **loss_kwargs: Any) -> LossSpec:
    """:func:`~specs_jax.losses.grpo_loss` over micro-batches (``old_logps``/``advantages`` in
    :attr:`SeqBatch.rows`). Each micro-batch divides by the whole batch's token count
    (``token-mean``) or sequence count (``seq-*``), so the contributions sum to the batch loss; its
    metrics are weighted by its share of the tokens. The log-probs use ``logits / temperature``.
    With ``kl_coef > 0`` the reference parameters come in ``ctx.extra``.
    """
    loss_fn = checked_loss("grpo", loss_kwargs, internal=("logits", "num_items_in_batch"))
    kl_coef = loss_kwargs.get("kl_coef", 0.01)
    token_mean = loss_kwargs.get("loss_agg", "token-mean") == "token-mean"

    def totals(batch: SeqBatch) -> dict[str, jax.Array]:
        return {"tokens": jnp.sum(batch.mask), "sequences": jnp.float32(batch.mask.shape[0] * batch.mask.shape[1])}

    def micro_loss(model, micro: SeqBatch, ctx: StepContext):
        logps = sequence_logps(model, micro, temperature)
        ref = None
        if kl_coef:
            if ctx.extra is None:
                raise ValueError("grpo with kl_coef > 0 needs the reference parameters (extra)")
            ref = jax.lax.stop_gradient(sequence_logps(model_from_params(graphdef, ctx.extra), micro, temperature))
        n = ctx.totals["tokens"] if token_mean else ctx.totals["sequences"]
        loss, metrics = loss_fn(logps, micro.rows["old_logps"], ref, micro.rows["advantages"], micro.mask,
                                num_items_in_batch=n, **loss_kwargs)
        share = jnp.sum(micro.mask) / jnp.maximum(ctx.totals["tokens"], 1.0)
        metrics = {k: v if k == "policy_loss" else share * v for k, v in metrics.items()}
        return loss, {**metrics, "tokens": jnp.sum(micro.mask)}

    return LossSpec(totals, micro_loss)

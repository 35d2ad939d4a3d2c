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

:class:`GRPO` is the ``grpo`` training kind (run by :class:`~specs_jax.training.rl.RLTrainer`): it trains
any registered loss of the GRPO family, i.e. with the inputs ``(logps, old_logps, ref_logps, advantages,
mask)`` (``loss.name``: ``grpo``, ``gspo``, ``cispo``, ``dr_grpo``, or one of your own).
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
from specs_jax.training.algorithm import Algorithm, loss_options, register_algorithm
from specs_jax.training.batches import SeqBatch, prepare_grpo, select_images
from specs_jax.training.state import model_from_params
from specs_jax.training.steps import LossSpec, StepContext, sequence_logps

__all__ = ["GRPO", "ScoredRollout", "grpo_spec", "rollout", "rollout_sequences", "specs_rewards"]

IS_OPTION = "sampler_is_mode"  # the GRPO-family option of the sampler/trainer importance correction

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


def grpo_spec(graphdef: nnx.GraphDef, loss_fn: Callable, temperature: float = 1.0, **loss_kwargs: Any) -> LossSpec:
    """A GRPO-family loss (signature of :func:`~specs_jax.losses.grpo_loss`) over micro-batches
    (``old_logps``/``advantages``, optionally ``sampler_logps``, in :attr:`SeqBatch.rows`). Each micro-batch
    divides by the whole batch's token count (``loss_agg: token-mean``) or sequence count (``seq-*``), so
    the contributions sum to the batch loss; its metrics are weighted by its share of the tokens. The
    log-probs use ``logits / temperature``. With ``kl_coef > 0`` the reference parameters come in
    ``ctx.extra``.
    """
    options = loss_options(loss_fn, loss_kwargs)
    kl_coef = options["kl_coef"]
    token_mean = options["loss_agg"] == "token-mean"

    def totals(batch: SeqBatch) -> dict[str, jax.Array]:
        return {"tokens": jnp.sum(batch.mask), "sequences": jnp.float32(batch.mask.shape[0] * batch.mask.shape[1])}

    def micro_loss(model, micro: SeqBatch, ctx: StepContext):
        logps = sequence_logps(model, micro, temperature)
        ref = None
        if kl_coef:
            if ctx.extra is None:
                raise ValueError("a GRPO-family loss with kl_coef > 0 needs the reference parameters (extra)")
            ref = jax.lax.stop_gradient(sequence_logps(model_from_params(graphdef, ctx.extra), micro, temperature))
        n = ctx.totals["tokens"] if token_mean else ctx.totals["sequences"]
        sampler = {"sampler_logps": micro.rows["sampler_logps"]} if "sampler_logps" in micro.rows else {}
        loss, metrics = loss_fn(logps, micro.rows["old_logps"], ref, micro.rows["advantages"], micro.mask,
                                num_items_in_batch=n, **sampler, **loss_kwargs)
        share = jnp.sum(micro.mask) / jnp.maximum(ctx.totals["tokens"], 1.0)
        metrics = {k: v if k == "policy_loss" else share * v for k, v in metrics.items()}
        return loss, {**metrics, "tokens": jnp.sum(micro.mask)}

    return LossSpec(totals, micro_loss)


@register_algorithm("grpo")
class GRPO(Algorithm):
    """GRPO (METHOD.md section 4) and its variants: any registered loss of the GRPO family (``loss.name``,
    default ``grpo``) with its options in ``loss.kwargs`` (``eps_low``, ``eps_high``, ``kl_coef``,
    ``loss_agg``, ``dual_clip``, ...). ``kl_coef > 0`` (the loss's default unless set) brings the frozen
    reference model. With the loss's importance-sampling option on, the old log-probs are recomputed by
    the trainer before the updates and the sampler's log-probs are passed as ``sampler_logps``."""

    data = "rl"
    default_loss = "grpo"
    loss_inputs = ("logps", "old_logps", "ref_logps", "advantages", "mask")
    internal = ("logits", "num_items_in_batch", "sampler_logps")
    batch_unit = "prompts"
    summary_metric = "reward/mean"

    @property
    def reference(self) -> bool:
        return self.option("kl_coef") > 0

    @property
    def importance_sampling(self) -> bool:
        """Whether the loss corrects for the sampler/trainer mismatch (then old log-probs are the trainer's)."""
        return bool(loss_options(self.loss_fn, self.loss_kwargs).get(IS_OPTION))

    def spec(self) -> LossSpec:
        """The loss over the step batch; Dr. GRPO's length normaliser ``max_completion_length`` defaults to
        ``rl.max_new_tokens`` (the rows also hold the prompt's columns)."""
        kwargs = dict(self.loss_kwargs)
        if "max_completion_length" in loss_options(self.loss_fn) and kwargs.get("max_completion_length") is None:
            kwargs["max_completion_length"] = self.cfg.rl.max_new_tokens
        return grpo_spec(self.graphdef, self.loss_fn, self.cfg.rl.temperature or 1.0, **kwargs)

    def sequences(self, prompts: Mapping[str, Any], ro: ScoredRollout) -> dict:
        seqs = rollout_sequences(self.model_cfg, prompts, ro, self.cfg.rl.group_size)
        if self.importance_sampling:
            seqs["sampler_logps"] = seqs["old_logps"].copy()
        return seqs

    def prepare(self, batch: Mapping[str, Any], accum: int) -> SeqBatch:
        return prepare_grpo(self.model_cfg, batch, accum)

    def refresh(self, model: nnx.Module, micro: SeqBatch) -> SeqBatch | None:
        """With importance sampling: the micro-batch with ``old_logps`` of the trainer's current policy."""
        if not self.importance_sampling:
            return None
        logps = jax.lax.stop_gradient(sequence_logps(model, micro, self.cfg.rl.temperature or 1.0))
        return micro._replace(rows={**micro.rows, "old_logps": jnp.where(micro.mask > 0, logps, 0.0)})

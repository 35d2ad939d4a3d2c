"""The supervised kinds: ``sft`` (NLL of the response) and ``dpo`` (preference loss against a frozen reference).

``sft`` trains any registered loss of ``(logps, mask)`` (default :func:`~specs_jax.losses.sft_loss`), ``dpo``
any loss of ``(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
chosen_mask, rejected_mask)`` (default :func:`~specs_jax.losses.dpo_hybrid_loss`). The DPO reference is a
frozen copy of the starting policy (``model.reference=batch``: log-probs computed in every step) or
log-probs already in the batches (``precomputed``, see
:meth:`~specs_jax.training.trainer.Trainer.precompute_reference`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specs_jax.training.algorithm import Algorithm, loss_options, register_algorithm
from specs_jax.training.batches import SeqBatch, pair_rows, prepare_dpo, prepare_sft
from specs_jax.training.state import model_from_params
from specs_jax.training.steps import LossSpec, StepContext, sequence_logps

__all__ = ["DPO", "SFT", "dpo_spec", "sft_spec"]


def sft_spec(loss_fn: Callable, **loss_kwargs: Any) -> LossSpec:
    """``loss_fn(logps, mask, num_items_in_batch=N)`` over micro-batches, ``N`` the response tokens of the
    whole batch, so the micro-batch losses sum to the token mean of the batch (:func:`sft_loss`)."""

    def totals(batch: SeqBatch) -> dict[str, jax.Array]:
        return {"tokens": jnp.sum(batch.mask)}

    def micro_loss(model, micro: SeqBatch, ctx: StepContext):
        n = jnp.maximum(ctx.totals["tokens"], 1.0)
        loss, metrics = loss_fn(sequence_logps(model, micro), micro.mask, num_items_in_batch=n, **loss_kwargs)
        return loss, {**metrics, "tokens": jnp.sum(micro.mask)}

    return LossSpec(totals, micro_loss)


def dpo_spec(graphdef: nnx.GraphDef, loss_fn: Callable, **loss_kwargs: Any) -> LossSpec:
    """Preference loss ``loss_fn`` (signature of :func:`dpo_hybrid_loss`) over micro-batches of ``b`` pairs,
    each pair's chosen row then its rejected row (:func:`~specs_jax.training.batches.pair_rows`: chosen rows
    are the even rows, rejected rows the odd ones).

    Reference log-probs come from ``ctx.extra`` (full reference parameters; computed per batch,
    no gradient) or, when ``extra`` is None, from ``micro.ref_logps`` (precomputed). The loss is a
    mean over pairs, so a micro-batch contributes ``(b / B) * loss_micro``; with
    ``sft_norm="token"`` its SFT weight is rescaled to ``sft_weight * (B / b) * (n / N)`` (``n``,
    ``N``: chosen tokens of the micro-batch and of the batch), which makes the sum over
    micro-batches equal the token-mean SFT term of the whole batch.
    """
    options = loss_options(loss_fn, loss_kwargs)
    token_norm = options.get("sft_norm") == "token" and "sft_weight" in options

    def totals(batch: SeqBatch) -> dict[str, jax.Array]:
        b = batch.mask.shape[1] // 2
        return {"pairs": jnp.float32(batch.mask.shape[0] * b), "chosen_tokens": jnp.sum(batch.mask[:, 0::2])}

    def micro_loss(model, micro: SeqBatch, ctx: StepContext):
        b = micro.mask.shape[0] // 2
        logps = sequence_logps(model, micro)
        if ctx.extra is not None:
            ref = jax.lax.stop_gradient(sequence_logps(model_from_params(graphdef, ctx.extra), micro))
        else:
            ref = micro.ref_logps
        weight = b / ctx.totals["pairs"]
        kwargs = dict(loss_kwargs)
        if token_norm:
            n = jnp.sum(micro.mask[0::2])
            kwargs["sft_weight"] = options["sft_weight"] * n / (weight * jnp.maximum(ctx.totals["chosen_tokens"], 1.0))
        loss, metrics = loss_fn(logps[0::2], logps[1::2], ref[0::2], ref[1::2], micro.mask[0::2], micro.mask[1::2],
                                **kwargs)
        metrics = {k: weight * v for k, v in metrics.items()}
        return weight * loss, {**metrics, "tokens": jnp.sum(micro.mask)}

    return LossSpec(totals, micro_loss)


@register_algorithm("sft")
class SFT(Algorithm):
    """Supervised fine-tuning: the token-mean NLL of the response tokens (``loss.name`` default ``sft``)."""

    data = "sft"
    default_loss = "sft"
    loss_inputs = ("logps", "mask")
    internal = ("num_items_in_batch",)

    def spec(self) -> LossSpec:
        return sft_spec(self.loss_fn, **self.loss_kwargs)

    def prepare(self, batch: Mapping[str, Any], accum: int) -> SeqBatch:
        return prepare_sft(self.model_cfg, batch, accum)


@register_algorithm("dpo")
class DPO(Algorithm):
    """Preference training against a frozen reference (``loss.name`` default ``dpo_hybrid``); host batches hold
    ``2B`` rows, the ``B`` chosen then the ``B`` rejected responses (step batches interleave them, see
    :func:`dpo_spec`). ``model.reference``: ``batch`` (a frozen copy of the starting policy in the step) or
    ``precomputed`` (``ref_logps`` in the batches)."""

    data = "preference"
    default_loss = "dpo_hybrid"
    loss_inputs = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                   "chosen_mask", "rejected_mask")
    batch_unit = "pairs"
    takes_precomputed_reference = True

    @property
    def reference(self) -> bool:
        return self.cfg.model.reference == "batch"

    def spec(self) -> LossSpec:
        return dpo_spec(self.graphdef, self.loss_fn, **self.loss_kwargs)

    def prepare(self, batch: Mapping[str, Any], accum: int) -> SeqBatch:
        return prepare_dpo(self.model_cfg, batch, accum)

    def rows(self, batch: Mapping[str, Any]) -> int:
        return len(batch["input_ids"]) // 2

    def row_order(self, batch: Mapping[str, Any]) -> np.ndarray:
        n = self.rows(batch)
        return pair_rows(np.arange(n), n)

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """A batch carries reference log-probs exactly when ``model.reference=precomputed``."""
        has_ref = batch.get("ref_logps") is not None
        if not self.reference and not has_ref:
            raise ValueError("model.reference=precomputed but the batch has no ref_logps "
                             "(see Trainer.precompute_reference)")
        if self.reference and has_ref:
            raise ValueError("the batch carries precomputed reference log-probs but model.reference=batch; "
                             "set model.reference=precomputed to use them")

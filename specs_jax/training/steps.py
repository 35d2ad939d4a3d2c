"""Jitted, sharded training steps built from a :class:`LossSpec`.

Extension point: a step is ``make_train_step(graphdef, spec, tx, ...)`` where ``spec`` says

- ``totals(batch) -> {name: scalar}``: normalisers of the whole (all micro-batches) batch, e.g.
  the number of response tokens, computed once per step;
- ``micro_loss(model, micro, ctx) -> (contribution, metrics)``: the micro-batch's share of the
  full-batch loss, so that the contributions of the micro-batches SUM to the loss of the whole
  batch (a token-mean loss divides its token sum by ``ctx.totals["tokens"]``, a sequence-mean
  loss multiplies its micro-batch mean by ``b / B``). Metrics are summed the same way.

Gradients of the contributions are accumulated over the micro-batches with ``lax.scan``, so
``grad_accum_steps`` micro-batches give the gradient of one big batch. The per-token log-probs
come from :func:`sequence_logps` (decoder hidden states + vocabulary-chunked log-softmax);
``grpo``/``opsd``/``vigos`` steps are further :class:`LossSpec` s over the same machinery, with
their extra inputs (old/reference log-probs, advantages, teacher logits) in the batch or ``extra``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from specs_jax.losses import get_loss, token_logps_from_hidden
from specs_jax.training.batches import SeqBatch
from specs_jax.training.sharding import batch_spec
from specs_jax.training.state import TrainState, join_params, model_from_params

__all__ = [
    "LossSpec", "StepContext", "batch_shardings", "checked_loss", "dpo_spec", "make_eval_step", "make_train_step", "sequence_logps",
    "sft_spec",
]


class StepContext(NamedTuple):
    """What a micro-batch loss sees besides the model and its micro-batch."""

    totals: dict[str, jax.Array]  # full-batch normalisers from LossSpec.totals
    extra: Any  # per-step inputs outside the batch (e.g. the reference parameters), or None
    rng: jax.Array  # PRNG key of this step (e.g. for dropout or sampling-based losses)


class LossSpec(NamedTuple):
    """How a step computes its loss (module docstring): full-batch ``totals`` and per-micro-batch
    ``micro_loss`` contributions that sum to the full-batch loss. The batch type is the step's own."""

    totals: Callable[[Any], dict[str, jax.Array]]
    micro_loss: Callable[[nnx.Module, Any, StepContext], tuple[jax.Array, dict[str, jax.Array]]]


def sequence_logps(model: nnx.Module, seq: SeqBatch, temperature: float = 1.0) -> jax.Array:
    """``[b, T]`` float32 ``log p(labels[t] | tokens <= t)`` of the prepared sequences."""
    hidden = model.hidden_states(seq.inputs)
    return token_logps_from_hidden(hidden, model.lm_head_weight().astype(hidden.dtype), seq.labels, temperature)


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask > 0, x, 0.0))


def sft_spec() -> LossSpec:
    """Token-mean NLL of the response tokens over the whole batch: ``-sum(logp * mask) / sum(mask)``."""

    def totals(batch: SeqBatch) -> dict[str, jax.Array]:
        return {"tokens": jnp.sum(batch.mask)}

    def micro_loss(model, micro: SeqBatch, ctx: StepContext):
        nll = -_masked_sum(sequence_logps(model, micro), micro.mask) / jnp.maximum(ctx.totals["tokens"], 1.0)
        return nll, {"nll": nll, "tokens": jnp.sum(micro.mask)}

    return LossSpec(totals, micro_loss)


def checked_loss(loss_name: str, loss_kwargs: dict[str, Any], internal: tuple[str, ...] = ()) -> Callable:
    """``get_loss(loss_name)`` after checking that every key of ``loss_kwargs`` is one of its keyword-only
    options (``internal``: options the step sets itself, refused too); ``ValueError`` naming the key."""
    loss_fn = get_loss(loss_name)
    params = inspect.signature(loss_fn).parameters
    options = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in internal]
    unknown = [k for k in loss_kwargs if k not in options]
    if unknown:
        raise ValueError(f"loss {loss_name!r} has no option(s) {unknown} (config loss.kwargs); options: {options}")
    return loss_fn


def dpo_spec(graphdef: nnx.GraphDef, loss_name: str = "dpo_hybrid", **loss_kwargs: Any) -> LossSpec:
    """Preference loss ``get_loss(loss_name)`` (signature of :func:`dpo_hybrid_loss`) over micro-batches of
    ``b`` chosen rows followed by their ``b`` rejected rows.

    Reference log-probs come from ``ctx.extra`` (full reference parameters; computed per batch,
    no gradient) or, when ``extra`` is None, from ``micro.ref_logps`` (precomputed). The loss is a
    mean over pairs, so a micro-batch contributes ``(b / B) * loss_micro``; with
    ``sft_norm="token"`` its SFT weight is rescaled to ``sft_weight * (B / b) * (n / N)`` (``n``,
    ``N``: chosen tokens of the micro-batch and of the batch), which makes the sum over
    micro-batches equal the token-mean SFT term of the whole batch.
    """
    loss_fn = checked_loss(loss_name, loss_kwargs)
    params = inspect.signature(loss_fn).parameters
    token_norm = loss_kwargs.get("sft_norm", params.get("sft_norm") and params["sft_norm"].default) == "token"

    def totals(batch: SeqBatch) -> dict[str, jax.Array]:
        b = batch.mask.shape[1] // 2
        return {"pairs": jnp.float32(batch.mask.shape[0] * b), "chosen_tokens": jnp.sum(batch.mask[:, :b])}

    def micro_loss(model, micro: SeqBatch, ctx: StepContext):
        b = micro.mask.shape[0] // 2
        logps = sequence_logps(model, micro)
        if ctx.extra is not None:
            ref = jax.lax.stop_gradient(sequence_logps(model_from_params(graphdef, ctx.extra), micro))
        else:
            ref = micro.ref_logps
        weight = b / ctx.totals["pairs"]
        kwargs = dict(loss_kwargs)
        if token_norm and "sft_weight" in params:
            n = jnp.sum(micro.mask[:b])
            sft_weight = kwargs.get("sft_weight", params["sft_weight"].default)
            kwargs["sft_weight"] = sft_weight * n / (weight * jnp.maximum(ctx.totals["chosen_tokens"], 1.0))
        loss, metrics = loss_fn(logps[:b], logps[b:], ref[:b], ref[b:], micro.mask[:b], micro.mask[b:], **kwargs)
        metrics = {k: weight * v for k, v in metrics.items()}
        return weight * loss, {**metrics, "tokens": jnp.sum(micro.mask)}

    return LossSpec(totals, micro_loss)


def batch_shardings(batch: SeqBatch, mesh: Mesh) -> SeqBatch:
    """Shardings of a stacked batch: rows (axis 1; axis 2 of ``positions [A, 3, b, T]``) over the
    ``(data, fsdp)`` axes, image arrays replicated."""
    def rows(axis: int, x) -> NamedSharding:
        return NamedSharding(mesh, batch_spec(x.ndim, axis))

    replicated = NamedSharding(mesh, PartitionSpec())
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch.labels.shape[1] % n:
        raise ValueError(f"micro-batch of {batch.labels.shape[1]} rows is not divisible by the data x fsdp "
                         f"mesh size {n}")
    inputs = batch.inputs
    vision = None if inputs.vision is None else jax.tree.map(lambda _: replicated, inputs.vision)
    return SeqBatch(
        inputs=type(inputs)(rows(1, inputs.input_ids), rows(2, inputs.positions), rows(1, inputs.attention_mask),
                            vision),
        labels=rows(1, batch.labels), mask=rows(1, batch.mask),
        ref_logps=None if batch.ref_logps is None else rows(1, batch.ref_logps),
        rows=None if batch.rows is None else {k: rows(1, v) for k, v in batch.rows.items()})


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` traced and run with ``mesh`` as the ambient mesh, so the model pins its activations' batch
    axis to the mesh's batch axes (:func:`specs_jax.model.layers.constrain_batch`). ``.lower`` too (AOT)."""
    def run(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    def lower(*args):
        with jax.set_mesh(mesh):
            return fn.lower(*args)

    run.lower = lower
    return run


def make_train_step(graphdef: nnx.GraphDef, spec: LossSpec, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, state_shardings: TrainState, batch_sharding: SeqBatch,
                    extra_shardings: Any = None) -> Callable[[TrainState, SeqBatch, Any], tuple[TrainState, dict]]:
    """``step(state, batch, extra) -> (new_state, metrics)``, jitted with explicit shardings, the
    state donated. ``batch`` is any pytree whose leaves are stacked ``[grad_accum_steps, ...]`` (a
    :class:`SeqBatch` for SFT/DPO; a step with more per-row inputs uses its own pytree and shardings).

    Per step: ``g = sum_micro grad(contribution)`` (lax.scan over micro-batches), then the
    optimizer update (clipping included in ``tx``). Metrics (replicated scalars): ``loss``,
    ``grad_norm`` (before clipping), ``lr`` (of this step), and the spec's summed metrics.
    """
    replicated = NamedSharding(state_shardings.step.mesh, PartitionSpec())

    def step(state: TrainState, batch: SeqBatch, extra: Any) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        ctx = StepContext(spec.totals(batch), extra, step_rng)

        def contribution(params: dict, micro: SeqBatch):
            return spec.micro_loss(model_from_params(graphdef, join_params(params, state.frozen)), micro, ctx)

        grad_fn = jax.value_and_grad(contribution, has_aux=True)
        first = jax.tree.map(lambda x: x[0], batch)
        (_, metric_shape), grad_shape = jax.eval_shape(grad_fn, state.params, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shape, jnp.float32(0), metric_shape))

        def body(carry, micro):
            (loss, metrics), grads = grad_fn(state.params, micro)
            return _tree_add(carry, (grads, loss, metrics)), None

        (grads, loss, metrics), _ = jax.lax.scan(body, zeros, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        return TrainState(state.step + 1, params, state.frozen, opt_state, rng), metrics

    return _under_mesh(jax.jit(step, in_shardings=(state_shardings, batch_sharding, extra_shardings),
                               out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
                       state_shardings.step.mesh)


def make_eval_step(graphdef: nnx.GraphDef, spec: LossSpec, state_shardings: TrainState, batch_sharding: SeqBatch,
                   extra_shardings: Any = None) -> Callable[[TrainState, SeqBatch, Any], dict]:
    """``evaluate(state, batch, extra) -> metrics``: the loss and the spec's metrics of a batch, no update."""
    replicated = NamedSharding(state_shardings.step.mesh, PartitionSpec())

    def evaluate(state: TrainState, batch: SeqBatch, extra: Any) -> dict:
        ctx = StepContext(spec.totals(batch), extra, state.rng)
        model = model_from_params(graphdef, join_params(state.params, state.frozen))

        def body(carry, micro):
            return _tree_add(carry, spec.micro_loss(model, micro, ctx)), None

        first = jax.eval_shape(lambda m: spec.micro_loss(model, m, ctx), jax.tree.map(lambda x: x[0], batch))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
        (loss, metrics), _ = jax.lax.scan(body, zeros, batch)
        return {**metrics, "loss": loss}

    return _under_mesh(jax.jit(evaluate, in_shardings=(state_shardings, batch_sharding, extra_shardings),
                               out_shardings=replicated), state_shardings.step.mesh)

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
come from :func:`sequence_logps` (decoder hidden states + vocabulary-chunked log-softmax). Each
training kind's :class:`~specs_jax.training.algorithm.Algorithm` builds its :class:`LossSpec`
(``sft``/``dpo`` in :mod:`~specs_jax.training.supervised`, ``grpo`` in :mod:`~specs_jax.training.grpo`,
``opsd``/``vigos`` in :mod:`~specs_jax.training.distill`), with its extra inputs (old/reference
log-probs, advantages, teacher logits) in the batch or ``extra``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from specs_jax.losses import token_logps_from_hidden
from specs_jax.training.batches import SeqBatch
from specs_jax.training.sharding import batch_spec
from specs_jax.training.state import TrainState, join_params, model_from_params

__all__ = ["LossSpec", "StepContext", "batch_shardings", "make_eval_step", "make_train_step", "sequence_logps",
           "under_mesh"]


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


def batch_shardings(batch: SeqBatch, mesh: Mesh) -> SeqBatch:
    """Shardings of a stacked, process-local batch: rows (axis 1; axis 2 of ``positions [A, 3, b, T]``) over
    the ``(data, fsdp)`` axes, the rows' images (:class:`~specs_jax.model.VisionInputs`, per row) with them."""
    def rows(axis: int, x) -> NamedSharding:
        return NamedSharding(mesh, batch_spec(x.ndim, axis))

    n, p = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
    if (batch.labels.shape[1] * p) % n:
        raise ValueError(f"micro-batch of {batch.labels.shape[1]} rows per process x {p} process(es) is not "
                         f"divisible by the data x fsdp mesh size {n}")
    inputs = batch.inputs
    vision = None if inputs.vision is None else jax.tree.map(lambda x: rows(1, x), inputs.vision)
    return SeqBatch(
        inputs=type(inputs)(rows(1, inputs.input_ids), rows(2, inputs.positions), rows(1, inputs.attention_mask),
                            vision),
        labels=rows(1, batch.labels), mask=rows(1, batch.mask),
        ref_logps=None if batch.ref_logps is None else rows(1, batch.ref_logps),
        rows=None if batch.rows is None else {k: rows(1, v) for k, v in batch.rows.items()})


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
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

    return under_mesh(jax.jit(step, in_shardings=(state_shardings, batch_sharding, extra_shardings),
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

    return under_mesh(jax.jit(evaluate, in_shardings=(state_shardings, batch_sharding, extra_shardings),
                               out_shardings=replicated), state_shardings.step.mesh)

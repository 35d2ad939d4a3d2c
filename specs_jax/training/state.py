"""Train state (parameters, optimizer state, step, RNG) and the optimizer built from a config.

Parameters live as pure nested dicts of arrays (``nnx.to_pure_dict`` of the model's Params), split
into ``params`` (trained) and ``frozen`` (e.g. the vision tower with ``model.freeze_vision``);
the model is rebuilt inside the jitted step with ``nnx.merge(graphdef, ...)``. The optimizer
state covers the trained parameters only, so frozen ones get no update and no moment buffers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from specs_jax.model import Qwen2_5_VLForConditionalGeneration
from specs_jax.training.config import OptimConfig
from specs_jax.training.sharding import param_shardings, tree_shardings_like

__all__ = [
    "FROZEN_VISION_PATH", "TrainState", "create_state", "join_params", "lr_schedule", "make_optimizer",
    "model_from_params", "split_frozen", "state_shardings",
]

FROZEN_VISION_PATH = ("model", "visual")
NO_DECAY = ("bias", "norm", "ln_q")  # parameter-path fragments excluded from weight decay


class TrainState(NamedTuple):
    """Everything a step updates and a checkpoint stores (a pytree).

    ``step``: int32 scalar, optimizer steps done. ``params``: trained parameters (nested dict).
    ``frozen``: parameters kept fixed (nested dict, possibly empty). ``opt_state``: the optax state
    of ``params``. ``rng``: a raw ``uint32[2]`` PRNG key, split once per step.
    """

    step: jax.Array
    params: dict
    frozen: dict
    opt_state: Any
    rng: jax.Array


def split_frozen(params: dict, freeze_vision: bool) -> tuple[dict, dict]:
    """``(trained, frozen)``: with ``freeze_vision`` the ``model.visual`` subtree moves to ``frozen``."""
    if not freeze_vision:
        return params, {}
    outer, inner = FROZEN_VISION_PATH
    trained = {**params, outer: {k: v for k, v in params[outer].items() if k != inner}}
    return trained, {outer: {inner: params[outer][inner]}}


def join_params(trained: dict, frozen: dict) -> dict:
    """Inverse of :func:`split_frozen`: the full parameter dict."""
    out = dict(trained)
    for k, v in frozen.items():
        out[k] = join_params(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def model_from_params(graphdef: nnx.GraphDef, params: dict) -> Qwen2_5_VLForConditionalGeneration:
    """The model with ``params`` (full pure dict) as its Params (traceable)."""
    return nnx.merge(graphdef, nnx.State(params))


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup ``0 -> lr`` over ``warmup_steps``, then ``constant`` lr, or ``cosine`` / ``linear``
    decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    rest = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    main = {"constant": lambda: optax.constant_schedule(cfg.lr),
            "cosine": lambda: optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio),
            "linear": lambda: optax.linear_schedule(cfg.lr, end, rest)}[cfg.schedule]()
    if cfg.warmup_steps == 0:
        return main
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def _decay_mask(params: dict) -> dict:
    def keep(path, _):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        return not any(frag in name for frag in NO_DECAY)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_grad_norm)`` (when > 0), then AdamW on :func:`lr_schedule`; biases and
    norm weights get no weight decay."""
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw) if cfg.max_grad_norm > 0 else adamw


def state_shardings(model: Qwen2_5_VLForConditionalGeneration, tx: optax.GradientTransformation,
                    freeze_vision: bool, mesh: Mesh, rules: dict) -> TrainState:
    """``NamedSharding`` of every leaf of the :class:`TrainState` of ``model`` (no arrays created)."""
    full = param_shardings(nnx.state(model, nnx.Param), mesh, rules)
    trained, frozen = split_frozen(full, freeze_vision)
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                          split_frozen(nnx.to_pure_dict(nnx.state(model, nnx.Param)), freeze_vision)[0])
    opt = tree_shardings_like(jax.eval_shape(tx.init, shapes), trained, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=replicated, params=trained, frozen=frozen, opt_state=opt, rng=replicated)


def create_state(model: Qwen2_5_VLForConditionalGeneration, tx: optax.GradientTransformation,
                 shardings: TrainState, freeze_vision: bool, seed: int) -> TrainState:
    """The initial :class:`TrainState` of ``model``, placed with ``shardings``."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    trained, frozen = split_frozen(params, freeze_vision)
    # copies, never aliases of the model's arrays: the step donates the state, the caller keeps its model
    trained = jax.device_put(trained, shardings.params, may_alias=False)
    frozen = jax.device_put(frozen, shardings.frozen, may_alias=False)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trained)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    rng = jax.device_put(jax.random.PRNGKey(seed), shardings.rng)
    return TrainState(step, trained, frozen, opt_state, rng)

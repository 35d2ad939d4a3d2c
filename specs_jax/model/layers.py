"""NNX building blocks with HF parameter layouts and logical sharding axis names.

Weights are stored as in PyTorch/HF (``Linear.weight [out, in]``) so checkpoint conversion is a
copy, not a transpose; XLA contracts either layout equally well. Every parameter carries
``out_sharding`` metadata: logical axes (``embed``, ``mlp``, ``heads``, ``vocab``, ``layers`` and their
``vision_*`` twins) that the trainer maps to mesh axes with its rules. Modules created with
``stack=L`` hold ``L`` layers' parameters on a leading ``layers`` axis and are applied one layer at
a time under ``jax.lax.scan`` (see :func:`scan_layers`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: Axes, dtype, init: str, stack: int | None) -> nnx.Param:
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dense(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """``x [..., in] @ w[out, in]^T -> [..., out]``, contracted as one ``[tokens, in] x [out, in]`` matrix product.

    Flattening the leading axes first keeps the weight gradient a single-axis ``[tokens, out] x [tokens, in]``
    dot, which XLA:CPU runs as it is; contracted over (batch, seq) instead, XLA:CPU transposed the output
    gradient first, with the producer's elementwise backward (e.g. SwiGLU's) fused into that transpose: 14% of
    ``scripts/bench_forward.py``'s step. The flattened axes are leading, so a batch-sharded ``x`` stays sharded.
    ``preferred_element_type``: the product's dtype (e.g. float32 logits from bf16 operands)."""
    y = jnp.einsum("ti,oi->to", x.reshape(-1, x.shape[-1]), w, preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:-1], w.shape[0])


class Linear(nnx.Module):
    """``y = x @ W^T + b`` with ``W [out, in]`` (HF layout); computed in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple[str, str],
                 dtype, param_dtype, rngs: nnx.Rngs, stack: int | None = None):
        self.weight = _param(rngs, (out_features, in_features), axes, param_dtype, "normal", stack)
        self.bias = _param(rngs, (out_features,), axes[:1], param_dtype, "zeros", stack) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense(x.astype(self.dtype), self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """``w * (x / sqrt(mean(x^2) + eps))``, normalised in fp32 then cast back (as HF)."""

    def __init__(self, dim: int, *, eps: float, axis: str, dtype, param_dtype, stack: int | None = None):
        self.weight = _param(None, (dim,), (axis,), param_dtype, "ones", stack)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(self.dtype) * x32.astype(x.dtype)).astype(self.dtype)


class Embedding(nnx.Module):
    """Token embedding table ``[vocab, embed]``; also the tied LM head."""

    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype, "normal", None)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``; with ``tile > 0``, over tiles of ``tile`` positions of a
    ``[B, T, H]`` input (:func:`sequence_tiled`), so its ``[B, tile, hidden]`` intermediates are all that
    exists of them at a time, in the forward and in the backward."""

    def __init__(self, dim: int, hidden: int, *, act: str, use_bias: bool, axes: tuple[str, str],
                 dtype, param_dtype, rngs: nnx.Rngs, stack: int | None = None, tile: int = 0):
        embed, mlp = axes
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
        self.gate_proj = Linear(dim, hidden, axes=(mlp, embed), **kw)
        self.up_proj = Linear(dim, hidden, axes=(mlp, embed), **kw)
        self.down_proj = Linear(hidden, dim, axes=(embed, mlp), **kw)
        self.act = act
        self.tile = tile

    def _apply(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.tile and x.ndim == 3 and x.shape[1] > self.tile:
            return sequence_tiled(self._apply, x, self.tile)
        return self._apply(x)


def sequence_tiled(fn: Callable[[jax.Array], jax.Array], x: jax.Array, tile: int) -> jax.Array:
    """``fn(x)`` for a position-wise ``fn`` (``[B, t, H] -> [B, t, H']`` row by row), computed over tiles of
    ``tile`` positions of ``x [B, T, H]`` (T zero-padded to a multiple, the padding dropped) under ``lax.map``,
    each tile under ``jax.checkpoint``: ``fn``'s intermediates exist for one tile at a time, and the backward
    recomputes them tile by tile (one more forward of ``fn``; the sequence-tiled MLP of long-sequence
    training). Returns ``[B, T, H']``."""
    b, t, h = x.shape
    pad = -t % tile
    tiles = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, (t + pad) // tile, tile, h)
    ys = jax.lax.map(jax.checkpoint(fn), jnp.moveaxis(tiles, 1, 0))  # [n, B, tile, H']
    return jnp.moveaxis(ys, 0, 1).reshape(b, t + pad, ys.shape[-1])[:, :t]


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (HF's rotate_half)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin``; ``x [..., T, H, D]``, ``cos/sin [..., T, D]`` (broadcast over heads)."""
    return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan_layers(layers: nnx.Module, carry: jax.Array, xs, body: Callable, remat: str = "none"):
    """Apply stacked layers one at a time: ``carry, y_i = body(layer_i, carry, xs_i)`` under ``lax.scan``.

    ``layers`` holds parameters with a leading ``layers`` axis; compile time does not grow with
    depth. ``xs`` (or None) is sliced along its leading axis like the parameters; the per-layer
    outputs ``y_i`` are stacked (e.g. a KV cache). ``remat`` (``none``/``full``/``dots``) wraps
    each layer in ``jax.checkpoint``. Returns ``(carry, ys)``.
    """
    graphdef, state = nnx.split(layers)

    def step(h, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), h, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))


BATCH_MESH_AXES = ("data", "fsdp")


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pin the leading (batch) axis of an activation ``[B, ...]`` to the ``(data, fsdp)`` axes of the
    ambient mesh (``jax.set_mesh``), the rest replicated. Without this, XLA may split a layer's
    activations over the hidden axis (following the FSDP-sharded weights) and compute every row on
    every device. No-op without a mesh holding both axes, or when B does not divide evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_MESH_AXES) <= set(mesh.axis_names):
        return x
    if x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return x
    spec = jax.sharding.PartitionSpec(BATCH_MESH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)

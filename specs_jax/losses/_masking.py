"""Masked reductions and input checks shared by the losses (internal)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_shapes(fn: str, expected: tuple[int, ...], **arrays: jax.Array | None) -> None:
    """Raise ``ValueError`` naming ``fn`` and the offending argument if a shape differs from ``expected``."""
    for name, x in arrays.items():
        if x is not None and tuple(x.shape) != tuple(expected):
            raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}, expected {tuple(expected)}")


def check_choice(fn: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{fn}: unknown {name} {value!r}; expected one of {list(choices)}")


def masked_sum(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """``sum(x * mask)`` in float32, ignoring non-finite values where ``mask`` is 0."""
    return jnp.sum(jnp.where(mask, x.astype(jnp.float32), 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """``sum(x * mask) / max(sum(mask), 1)``; 0 for an empty mask."""
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)

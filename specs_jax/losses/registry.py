"""Name -> loss function registry, so a training config can select a loss by string.

Adding a loss is writing one function::

    @register_loss("my_loss")
    def my_loss(logps, mask, *, alpha: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
        ...

and naming it in the config (``loss: my_loss``). Every registered loss returns ``(loss, metrics)``
with a scalar loss and a dict of scalar metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["get_loss", "list_losses", "register_loss"]

LossFn = TypeVar("LossFn", bound=Callable)

_LOSSES: dict[str, Callable] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator registering a loss function under ``name``; the function is returned unchanged."""

    def decorator(fn: LossFn) -> LossFn:
        if name in _LOSSES and _LOSSES[name] is not fn:
            raise ValueError(
                f"loss {name!r} is already registered (by {_LOSSES[name].__module__}.{_LOSSES[name].__name__})"
            )
        _LOSSES[name] = fn
        return fn

    return decorator


def get_loss(name: str) -> Callable:
    """The loss registered under ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {list_losses()}") from None


def list_losses() -> list[str]:
    """Sorted names of the registered losses."""
    return sorted(_LOSSES)

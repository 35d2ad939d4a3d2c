"""The rollout weight layout: the parameters resharded, once per RL step, into a layout chosen for decoding.

The trainer keeps its parameters FSDP-sharded; decoding on them would all-gather every weight at every decode
step. The rollout layout is a mesh over the same devices with ``fsdp = 1``: ``tensor = K`` devices split the
heads / MLP / vocabulary (Megatron style, the ``tensor`` rules of
:data:`specs_jax.training.sharding.DEFAULT_RULES`), and the ``data = N / K`` groups each hold a full copy and
decode their own share of the slots (the engine pins the slot axis to ``data``). ``K = 1``: every device holds
the whole model and a decode step moves no weight. The copy is in the compute dtype (``model.dtype``).

``rl.rollout_mesh``: ``trainer`` (decode on the trainer's layout, no copy), ``auto`` (:func:`rollout_tensor_size`)
or an int ``K``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from specs_jax.training.sharding import make_mesh, param_shardings

WEIGHT_FRACTION = 0.4  # auto: the rollout copy of the weights may take this share of a device's memory


def parse_rollout_mesh(value: Any) -> str | int:
    """``rl.rollout_mesh`` -> ``"trainer"``, ``"auto"`` or a tensor-parallel size ``K >= 1`` (an int or its digits)."""
    if value in ("trainer", "auto"):
        return value
    if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"rl.rollout_mesh must be 'trainer', 'auto' or a tensor-parallel size >= 1, got {value!r}")


def rollout_tensor_size(param_bytes: int, device_bytes: int | None, devices: int, local_devices: int,
                        fraction: float = WEIGHT_FRACTION) -> int:
    """Smallest ``K`` (a power of two dividing ``devices``, at most ``local_devices`` so tensor parallelism stays
    within a host) with ``param_bytes / K <= fraction * device_bytes``; 1 when the device memory is unknown.
    Raises when even ``K = local_devices`` does not fit."""
    if device_bytes is None:
        return 1
    k = 1
    while param_bytes / k > fraction * device_bytes:
        k *= 2
        if k > local_devices or devices % k:
            raise ValueError(f"the rollout copy of {param_bytes / 2**30:.1f} GiB of weights does not fit "
                             f"{fraction:.0%} of a device ({device_bytes / 2**30:.1f} GiB) with tensor parallelism "
                             f"within a host ({local_devices} devices): set rl.rollout_mesh=trainer")
    return k


def rollout_mesh(devices: list, tensor: int) -> Mesh:
    """The rollout mesh ``data = len(devices) / tensor, fsdp = 1, tensor`` over ``devices``."""
    if len(devices) % tensor:
        raise ValueError(f"rl.rollout_mesh tensor size {tensor} does not divide the {len(devices)} devices")
    return make_mesh(data=len(devices) // tensor, fsdp=1, tensor=tensor, devices=devices)


def rollout_shardings(model: nnx.Module, mesh: Mesh, rules: dict) -> dict:
    """Pure-dict tree of the rollout layout's ``NamedSharding`` of every parameter of ``model``."""
    return param_shardings(nnx.state(model, nnx.Param), mesh, rules)


def reshard(params: dict, shardings: dict, dtype: Any) -> dict:
    """``params`` cast to the compute ``dtype`` and copied into ``shardings`` one leaf at a time (each transfer its
    own chunk; the trainer's copy is left as it is). Every layer casts its weights to the compute dtype before
    use, so decoding on the cast copy gives the same results in half the memory of float32 master weights.
    Pure dicts of the same structure."""
    dtype = np.dtype(dtype)
    return jax.tree.map(lambda x, s: jax.device_put(x.astype(dtype) if x.dtype != dtype else x, s, may_alias=False),
                        params, shardings)


def device_bytes() -> int | None:
    """Memory of one device in bytes, or None where the platform reports none (CPU)."""
    return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def param_bytes(params: Any, dtype: Any) -> int:
    """Bytes of a parameter tree cast to ``dtype`` (the rollout copy): ``sum(size) * itemsize(dtype)``."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))) * np.dtype(dtype).itemsize

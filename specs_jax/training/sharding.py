"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimizer state sharded, ZeRO-3 style) and ``tensor`` (Megatron-style tensor
parallelism over heads / MLP / vocabulary). Parameters carry logical axis names in their
``out_sharding`` metadata (see :mod:`specs_jax.model.layers`); :data:`DEFAULT_RULES` maps them to
mesh axes. A dimension whose size is not divisible by its mesh axes' size, or whose mesh axis is
already used by an earlier dimension of the same array, stays replicated.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:
    from specs_jax.training.config import MeshConfig

__all__ = [
    "BATCH_AXES", "DEFAULT_RULES", "MESH_AXES", "batch_spec", "logical_to_spec", "make_mesh", "make_rules",
    "agree_max", "allgather_arrays", "allgather_json", "allgather_rows", "owns_batch", "spans_processes",
    "check_processes_agree",
    "initialize_processes", "param_shardings", "process_batch_slice", "tree_shardings_like",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
Rule = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, Rule] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "vision_embed": "fsdp",
    "vision_heads": None,
    "vision_qkv": None,
    "vision_mlp": None,
}


def make_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, Rule]:
    """:data:`DEFAULT_RULES` updated with ``overrides`` (list values become tuples); unknown mesh axes refused."""
    rules = dict(DEFAULT_RULES)
    for name, rule in (overrides or {}).items():
        rule = tuple(rule) if isinstance(rule, (list, tuple)) else rule
        for axis in (rule if isinstance(rule, tuple) else (rule,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"mesh rule {name!r} -> {rule!r}: unknown mesh axis {axis!r}; known: {MESH_AXES}")
        rules[name] = rule
    return rules


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all); at most one size may be -1 (fill)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill), got {fill}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh sizes {sizes}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    rules: Mapping[str, Rule]) -> PartitionSpec:
    """Mesh ``PartitionSpec`` of an array with logical ``axes``, falling back to replicated per dimension
    where the size is not divisible by the mesh axes' size or a mesh axis is already used."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no mesh rule; rules: {sorted(rules)}")
        rule = rules.get(name) if name is not None else None
        mesh_axes = tuple(a for a in ((rule,) if isinstance(rule, str) else (rule or ())) if mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or size % n or used & set(mesh_axes):
            spec.append(None)
            continue
        used |= set(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def param_shardings(params: nnx.State, mesh: Mesh, rules: Mapping[str, Rule]) -> dict:
    """Pure-dict tree of ``NamedSharding`` for an ``nnx.State`` of Params, from their ``out_sharding`` axes."""
    def one(var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(var.shape), mesh, rules))

    return nnx.to_pure_dict(jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def tree_shardings_like(tree: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. an optax state) that embeds copies of the params tree (Adam's mu and
    nu): each params-shaped subtree gets ``params_shardings``, every other leaf is replicated."""
    params_def = jax.tree.structure(params_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_params(x: Any) -> bool:
        return jax.tree.structure(x) == params_def

    return jax.tree.map(lambda x: params_shardings if is_params(x) else replicated, tree, is_leaf=is_params)


def batch_spec(ndim: int, batch_dim: int = 0) -> PartitionSpec:
    """``PartitionSpec`` sharding dimension ``batch_dim`` over the ``(data, fsdp)`` axes."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return PartitionSpec(*spec)


def process_batch_slice(global_batch: int, process_index: int | None = None,
                        process_count: int | None = None) -> slice:
    """Rows of the global batch this host loads: ``[i * B/P, (i+1) * B/P)`` for host ``i`` of ``P``."""
    i = jax.process_index() if process_index is None else process_index
    p = jax.process_count() if process_count is None else process_count
    if global_batch % p:
        raise ValueError(f"global batch {global_batch} is not divisible by the {p} processes")
    per = global_batch // p
    return slice(i * per, (i + 1) * per)


MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_processes(cfg: MeshConfig) -> bool:
    """Join a multi-process job (one process per host, or several on one CPU machine) before JAX starts its
    backend; returns whether this is one.

    Explicit: ``cfg.coordinator_address`` / ``num_processes`` / ``process_id`` (any cluster; N local CPU
    processes). Auto-detected: with ``cfg.distributed`` and one of :data:`MULTIHOST_ENV` set (Cloud TPU,
    SLURM, OpenMPI, GKE), ``jax.distributed.initialize()`` reads the coordinator and ranks itself. On CPU the
    processes' collectives go over gloo. A process that stops answering for ``heartbeat_timeout_s`` makes
    every other one stop with an error (no hang). Calling it again in the same process is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = cfg.coordinator_address is not None
    if not explicit:
        if not cfg.distributed or not any(os.environ.get(k) for k in MULTIHOST_ENV):
            return False
        if os.environ.get("SLURM_NTASKS") == "1" or os.environ.get("OMPI_COMM_WORLD_SIZE") == "1":
            return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only read by the CPU backend
    kwargs = dict(heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    if explicit:
        kwargs.update(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                      process_id=cfg.process_id)
    jax.distributed.initialize(**kwargs)
    return True


def check_processes_agree(**values: Any) -> None:
    """Every process of the job holds the same ``values`` (e.g. the config hash, the data size), else a
    ``ValueError`` on every process naming the keys that differ and each process's value."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    keys = sorted(values)
    digests = np.array([int.from_bytes(hashlib.sha256(repr(values[k]).encode()).digest()[:4], "little")
                        for k in keys], np.int64)
    every = np.asarray(multihost_utils.process_allgather(digests))  # [processes, keys]
    differ = [k for i, k in enumerate(keys) if len(set(every[:, i].tolist())) > 1]
    if differ:
        raise ValueError(f"the {jax.process_count()} processes of this job disagree on {differ} (this process, "
                         f"{jax.process_index()}: {({k: values[k] for k in differ})}); start every process with the "
                         "same config and data")


def agree_max(*values: int) -> tuple[int, ...]:
    """Each value's largest over the processes of the job (unchanged on one process): the shapes every process
    pads its rows to (sequence widths, image patch budgets), since the rows of a global array must agree."""
    if jax.process_count() == 1:
        return tuple(int(v) for v in values)
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.array(values, np.int64)))  # [processes, values]
    return tuple(int(v) for v in every.max(0))


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's ``x [n_p, ...]`` concatenated in process order (``n_p`` may differ between processes, the
    trailing shape and dtype must not); ``x`` itself on one process."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.array([len(x)], np.int64)))[:, 0]
    padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
    padded[:len(x)] = x
    every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, max rows, ...]
    return np.concatenate([every[p, :n] for p, n in enumerate(counts)])


def allgather_json(value: Any) -> list:
    """Every process's JSON-serialisable ``value``, in process order (``[value]`` on one process)."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = allgather_rows(np.array([len(raw)], np.int64))
    every = allgather_rows(raw)
    return [json.loads(every[end - n:end].tobytes()) for n, end in zip(lengths, np.cumsum(lengths))]


def spans_processes(tree: Any) -> bool:
    """Whether ``tree`` holds global arrays of a multi-process job (a leaf another process also holds a part of);
    numpy leaves and one process's own arrays do not."""
    return jax.process_count() > 1 and not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree))


def owns_batch(index: int) -> bool:
    """Whether this process runs batch ``index`` of a sequence of batches that the processes share round-robin
    (process ``i`` of ``n`` runs batches ``i, i + n, ...``): each batch keeps the rows and seed it has in a
    one-process run, so the results are those of one process."""
    return index % jax.process_count() == jax.process_index()


def allgather_arrays(arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Every process's list of numpy arrays (any shapes and dtypes; ``.npy`` bytes, no pickle), in process order."""
    if jax.process_count() == 1:
        return [list(arrays)]
    blobs = []
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, np.asarray(a), allow_pickle=False)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    lengths = allgather_json([len(b) for b in blobs])
    every = allgather_rows(np.concatenate(blobs) if blobs else np.zeros(0, np.uint8))
    out, start = [], 0
    for sizes in lengths:
        mine = []
        for n in sizes:
            mine.append(np.load(io.BytesIO(every[start:start + n].tobytes()), allow_pickle=False))
            start += n
        out.append(mine)
    return out

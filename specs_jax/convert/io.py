"""Loading and saving Qwen2.5-VL weights: HF safetensors directories and this project's Orbax checkpoints.

Name mapping: the NNX state path ``model.language_model.layers.self_attn.q_proj.weight`` holds
``[num_layers, ...]`` and corresponds to the module names
``model.language_model.layers.{i}.self_attn.q_proj.weight`` of transformers' model; every other
path is the module name itself. On disk, transformers' ``save_pretrained`` (and the published
Qwen checkpoints) write the decoder as ``model.*`` and the vision tower as ``visual.*``; HF output
here uses that same on-disk layout, and both layouts are read.

Orbax checkpoint layout written here (``load_model`` reads it back)::

    OUT_DIR/config.json        the HF config, verbatim
    OUT_DIR/specs_jax.json     {"format": "specs-jax-orbax", "version": 1}
    OUT_DIR/params/            Orbax StandardCheckpointer tree {state path: array}
    OUT_DIR/tokenizer* ...     tokenizer/processor files carried from the source

Both conversions write into a temporary sibling directory and rename it into place only
once everything is written, so a failed conversion leaves ``OUT_DIR`` untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specs_jax.convert.safetensors_io import StreamWriter, TensorInfo, read_header, read_tensor
from specs_jax.model.config import ModelConfig, load_config
from specs_jax.model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

FORMAT = {"format": "specs-jax-orbax", "version": 1}
STACKED = ("blocks", "layers")  # the scanned module containers
CARRIED_FILES = re.compile(
    r"^(tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|chat_template\..*|"
    r".*preprocessor_config\.json|processor_config\.json|generation_config\.json)$")
MAX_SHARD_BYTES = 5 * 1024**3
# Orbax's in-flight budget while saving/restoring is the largest single array (it must fit one),
# which bounds conversion memory to ~1x the checkpoint plus that array.
MIN_CONCURRENT_BYTES = 64 * 1024**2


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


# --------------------------------------------------------------------------------------------
# Names and shapes
# --------------------------------------------------------------------------------------------

def abstract_model(cfg: ModelConfig) -> Qwen2_5_VLForConditionalGeneration:
    """The model with ``ShapeDtypeStruct`` parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))


def state_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_specs(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """``{state path: ShapeDtypeStruct}`` of every parameter (stacked layers included)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return {state_key(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def hf_names(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of one state entry (one per layer for stacked entries)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in STACKED and i >= 2 and parts[i - 1] in ("visual", "language_model"):
            head, tail = ".".join(parts[: i + 1]), ".".join(parts[i + 1:])
            return [(f"{head}.{n}.{tail}", shape[1:]) for n in range(shape[0])]
    return [(key, shape)]


def normalize_hf_name(name: str) -> str:
    """On-disk HF name (``model.layers.*``, ``visual.*``) -> module name (``model.language_model.*``,
    ``model.visual.*``); module names pass through."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model."):]
    return name


def disk_hf_name(name: str) -> str:
    """Module name -> the on-disk name ``save_pretrained`` writes (inverse of :func:`normalize_hf_name`)."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def _is_hf_dir(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _is_orbax_dir(path: Path) -> bool:
    return (path / "specs_jax.json").is_file() and (path / "params").is_dir()


def hf_tensor_index(path: Path) -> dict[str, TensorInfo]:
    """``{normalized HF name: TensorInfo}`` over all safetensors shards of an HF directory."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    index: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(path / file).items():
            index[normalize_hf_name(name)] = info
    return index


def check_tensors(cfg: ModelConfig, available: dict[str, tuple[int, ...]],
                  what: str = "checkpoint does not match its config") -> None:
    """Refuse a checkpoint whose tensors are not exactly those of ``cfg``'s model (``what`` opens the message).

    A tied model may also carry ``lm_head.weight`` (some exporters write the tied copy); it is ignored.
    """
    expected = {name: shape for key, spec in param_specs(cfg).items() for name, shape in hf_names(key, spec.shape)}
    missing = sorted(set(expected) - set(available))
    extra = sorted(set(available) - set(expected) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    wrong = sorted(n for n in set(expected) & set(available) if tuple(available[n]) != tuple(expected[n]))
    problems = [f"missing tensor {n} (expected shape {expected[n]})" for n in missing[:10]]
    problems += [f"unexpected tensor {n} (shape {tuple(available[n])})" for n in extra[:10]]
    problems += [f"tensor {n} has shape {tuple(available[n])}, expected {expected[n]}" for n in wrong[:10]]
    if problems:
        more = len(missing) + len(extra) + len(wrong) - len(problems)
        raise CheckpointError(f"{what}:\n  " + "\n  ".join(problems)
                              + (f"\n  ... and {more} more" if more > 0 else ""))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def iter_hf_params(path: Path, cfg: ModelConfig, dtype: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(state path, array)`` for every parameter, stacking per-layer tensors; one array in
    memory at a time besides the caller's. ``dtype`` casts (default: the checkpoint's dtype)."""
    index = hf_tensor_index(path)
    check_tensors(cfg, {n: info.shape for n, info in index.items()})
    # Largest first: the last reads, when the most is already held, are then the smallest.
    specs = sorted(param_specs(cfg).items(), key=lambda kv: -int(np.prod(kv[1].shape)))
    for key, spec in specs:
        names = hf_names(key, spec.shape)
        infos = [index[n] for n, _ in names]
        src = infos[0].dtype
        if len(names) == 1 and names[0][0] == key:
            arr = read_tensor(infos[0])
        else:
            arr = np.empty(spec.shape, src)
            for i, info in enumerate(infos):
                read_tensor(info, arr[i])
        yield key, arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)


def _checkpointer(largest_array_bytes: int):
    import orbax.checkpoint as ocp

    gb = (max(largest_array_bytes, MIN_CONCURRENT_BYTES) + 2**20) / 1e9  # Orbax needs strictly more
    # No compression: weights barely compress, and the compressed copy of an in-flight array
    # would add another array's worth of memory.
    # this process alone, also inside a multi-process job (e.g. process 0 exporting a run's checkpoint)
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_concurrent_gb=gb, restore_concurrent_gb=gb,
                                                        use_compression=False, multiprocessing_options=alone),
                            multiprocessing_options=alone)


def restore_orbax_params(path: Path, cfg: ModelConfig) -> dict[str, jax.Array]:
    largest = max(int(np.prod(s.shape)) for s in param_specs(cfg).values()) * 4
    with _checkpointer(largest) as ckpt:
        return dict(ckpt.restore((path / "params").absolute()))


def _build(cfg: ModelConfig, params: dict[str, np.ndarray]) -> Qwen2_5_VLForConditionalGeneration:
    graphdef, state = nnx.split(abstract_model(cfg))
    pdt = jnp.dtype(cfg.param_dtype)
    for path, var in nnx.to_flat_state(state):
        key = state_key(path)
        var.set_value(jnp.asarray(params.pop(key), dtype=pdt))
    return nnx.merge(graphdef, state)


def load_model(path: str | os.PathLike, dtype: str = "float32", *, param_dtype: str | None = None,
               remat: str = "none", step: int | str | None = None,
               attention: str = "auto", mlp_tile: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Load Qwen2.5-VL from an HF directory (config.json + safetensors, sharded or not), an Orbax
    checkpoint directory written by this project, or a training checkpoint: ``RUN/checkpoints/STEP``,
    or ``RUN`` with ``step`` = ``"latest"``, ``"best"`` or N (:mod:`specs_jax.convert.training`).

    ``dtype`` is the compute dtype; ``param_dtype`` (default: ``dtype``) the parameters' dtype;
    ``attention`` the attention backend (``auto | xla | splash | cudnn | blockwise``, see
    :mod:`specs_jax.model.attention`); ``remat`` and ``mlp_tile`` as in :class:`specs_jax.model.config.ModelConfig`.
    """
    local = Path(path)
    is_model_dir = "://" not in os.fspath(path) and (_is_orbax_dir(local) or _is_hf_dir(local))
    if step is not None and is_model_dir:
        raise ValueError(f"step={step!r} is for training checkpoints; {path} is a model directory")
    if not is_model_dir:
        from specs_jax.convert.training import is_training_reference, load_training_model

        if step is not None or is_training_reference(path):
            return load_training_model(path, step, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                       attention=attention, mlp_tile=mlp_tile)
        if (local / "config.json").is_file():
            load_config(local)  # a config of another architecture is the clearer error
        raise FileNotFoundError(f"{path}: neither an HF model directory (model.safetensors[.index.json]), "
                                f"a specs-jax Orbax checkpoint (specs_jax.json + params/), nor a training "
                                f"checkpoint (RUN/checkpoints/STEP, or RUN with a step)")
    cfg = load_config(local, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, mlp_tile=mlp_tile)
    if _is_orbax_dir(local):
        params = restore_orbax_params(local, cfg)
        check_tensors(cfg, {n: s for k, v in params.items() for n, s in hf_names(k, v.shape)})
        return _build(cfg, params)
    return _build(cfg, dict(iter_hf_params(local, cfg)))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; rename it to ``out_dir`` only on success."""
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _carry_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and CARRIED_FILES.match(f.name):
            shutil.copy2(f, dst / f.name)


def _config_with_dtype(hf: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    if dtype is None:
        return hf
    hf = dict(hf)
    hf["torch_dtype" if "torch_dtype" in hf and "dtype" not in hf else "dtype"] = dtype
    return hf


def _np_dtype(dtype: str | None) -> np.dtype | None:
    return None if dtype is None else np.dtype(jnp.dtype(dtype))


def save_orbax(out: Path, cfg: ModelConfig, params: dict[str, jax.Array]) -> None:
    """Write an Orbax checkpoint of ``params`` (``{state path: jax.Array}``) and the config into ``out``.

    Pass jax arrays, not numpy: Orbax copies a numpy tree whole before writing, but streams jax
    arrays within its ``save_concurrent_gb`` budget.
    """
    import orbax.checkpoint as ocp

    (out / "config.json").write_text(json.dumps(cfg.hf_config, indent=2))
    with _checkpointer(max(v.nbytes for v in params.values())) as ckpt:
        ckpt.save(out / "params", args=ocp.args.PyTreeSave(params))
    (out / "specs_jax.json").write_text(json.dumps(FORMAT))


def _to_jax(arr: np.ndarray) -> jax.Array:
    """Hand a numpy buffer to JAX without a copy where dlpack can (not bfloat16: numpy's dlpack
    export knows no such dtype, so those are copied)."""
    try:
        return jax.dlpack.from_dlpack(arr)
    except (BufferError, TypeError):
        return jax.device_put(arr)


def hf_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
                overwrite: bool = False) -> Path:
    """Convert an HF Qwen2.5-VL directory to a specs-jax Orbax checkpoint (``dtype`` casts)."""
    src = Path(hf_dir)
    cfg = load_config(src)
    cfg = cfg.replace(hf_config=_config_with_dtype(cfg.hf_config, dtype))
    params = {key: _to_jax(arr) for key, arr in iter_hf_params(src, cfg, _np_dtype(dtype))}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_orbax(tmp, cfg, params)
        _carry_files(src, tmp)
    return Path(out_dir)


class HFTensor(NamedTuple):
    """One tensor of an HF checkpoint: its on-disk name and where it lives in the state tree."""

    name: str
    key: str  # state path
    layer: int | None  # index into the stacked ``layers`` axis, or None
    shape: tuple[int, ...]
    dtype: np.dtype


def hf_plan(cfg: ModelConfig, dtypes: dict[str, np.dtype]) -> list[HFTensor]:
    """The HF tensors of a ``{state path: dtype}`` tree, in state order."""
    plan = []
    for key, spec in param_specs(cfg).items():
        names = hf_names(key, spec.shape)
        stacked = not (len(names) == 1 and names[0][0] == key)
        for i, (name, shape) in enumerate(names):
            plan.append(HFTensor(disk_hf_name(name), key, i if stacked else None, tuple(shape), np.dtype(dtypes[key])))
    return plan


def _cast(arr: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)


def write_hf_weights(out: Path, plan: list[HFTensor], fetch: Callable[[str], np.ndarray],
                     max_shard_bytes: int = MAX_SHARD_BYTES, cast: np.dtype | None = None) -> None:
    """Write ``model.safetensors`` or, past ``max_shard_bytes``, numbered shards plus the index.

    ``fetch(key)`` returns the array of one state entry; it is called once per entry, in plan
    order, and only that entry is held while its tensors are written. ``cast``: convert each
    tensor to this dtype as it is written (one layer's copy at a time, not the whole entry's).
    """
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in plan:
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    current_key, current = None, None
    total = 0
    for file, shard in zip(files, shards):
        with StreamWriter(out / file, [(t.name, t.dtype, t.shape) for t in shard]) as writer:
            for t in shard:
                if t.key != current_key:
                    current_key, current = t.key, None  # drop the previous entry before fetching
                    current = fetch(t.key)
                writer.write(t.name, _cast(current if t.layer is None else current[t.layer], cast))
            total += writer.nbytes
    if len(shards) > 1:
        weight_map = {t.name: file for file, shard in zip(files, shards) for t in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_hf(out: Path, cfg: ModelConfig, params: dict[str, jax.Array | np.ndarray],
            max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write an HF directory (config.json + safetensors) that ``from_pretrained`` loads."""
    (out / "config.json").write_text(json.dumps(cfg.hf_config, indent=2))
    plan = hf_plan(cfg, {k: v.dtype for k, v in params.items()})
    write_hf_weights(out, plan, lambda key: np.asarray(params[key]), max_shard_bytes)


def orbax_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
                overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES, *, step: int | str | None = None,
                model: str | os.PathLike | None = None) -> Path:
    """Convert a specs-jax Orbax checkpoint to an HF directory (``dtype`` casts).

    ``ckpt_dir`` may also be a training checkpoint, ``RUN/checkpoints/STEP`` or ``RUN`` with ``step``
    (``"latest"``, ``"best"``, N): see :func:`specs_jax.convert.training.training_to_hf` (``model``:
    the model directory to take the config and tokenizer files from instead of the run's record).

    Streams: each state entry is restored on its own (Orbax partial restore), written, and
    dropped, so memory holds one entry at a time.
    """
    import orbax.checkpoint as ocp

    src = Path(ckpt_dir)
    if "://" in os.fspath(ckpt_dir) or not _is_orbax_dir(src):
        from specs_jax.convert.training import is_training_reference, training_to_hf

        if step is not None or model is not None or is_training_reference(ckpt_dir):
            return training_to_hf(ckpt_dir, out_dir, step=step, dtype=dtype, model=model, overwrite=overwrite,
                                  max_shard_bytes=max_shard_bytes)
        raise FileNotFoundError(f"{src}: not a specs-jax Orbax checkpoint (needs specs_jax.json and params/) nor a "
                                f"training checkpoint (RUN/checkpoints/STEP, or RUN with --step latest|best|N)")
    if step is not None or model is not None:
        raise ValueError(f"--step and --model are for training checkpoints; {src} is an Orbax model checkpoint")
    cfg = load_config(src)
    params_dir = (src / "params").absolute()
    with _checkpointer(0) as ckpt:
        stored = dict(ckpt.metadata(params_dir).item_metadata.tree)
    check_tensors(cfg, {n: s for k, m in stored.items() for n, s in hf_names(k, tuple(m.shape))})
    to = _np_dtype(dtype)
    plan = hf_plan(cfg, {k: to or np.dtype(m.dtype) for k, m in stored.items()})
    largest = max(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in stored.values())

    def fetch(key: str) -> np.ndarray:
        with _checkpointer(largest) as ckpt:
            item = {key: np.zeros((), np.dtype(stored[key].dtype))}
            args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                          restore_args={key: ocp.RestoreArgs(restore_type=np.ndarray)})
            return ckpt.restore(params_dir, args=args)[key]

    cfg = cfg.replace(hf_config=_config_with_dtype(cfg.hf_config, dtype))
    with atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.hf_config, indent=2))
        write_hf_weights(tmp, plan, fetch, max_shard_bytes, cast=to)
        _carry_files(src, tmp)
    return Path(out_dir)


def model_params(model: Qwen2_5_VLForConditionalGeneration) -> dict[str, jax.Array]:
    """``{state path: jax.Array}`` of a model's parameters (for saving)."""
    state = nnx.state(model, nnx.Param)
    return {state_key(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def save_model(model: Qwen2_5_VLForConditionalGeneration, out_dir: str | os.PathLike, fmt: str = "orbax",
               carry_from: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Save a model as an Orbax checkpoint (``fmt="orbax"``) or an HF directory (``fmt="hf"``)."""
    writers: dict[str, Callable] = {"orbax": save_orbax, "hf": save_hf}
    if fmt not in writers:
        raise ValueError(f"fmt={fmt!r}; expected one of {sorted(writers)}")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writers[fmt](tmp, model.config, model_params(model))
        if carry_from is not None:
            _carry_files(Path(carry_from), tmp)
    return Path(out_dir)

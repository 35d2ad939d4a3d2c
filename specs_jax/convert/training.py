"""Training checkpoints as model references: convert, load and evaluate any step of a run.

``specs-jax train ... train.output_dir=RUN`` keeps its checkpoints in ``RUN/checkpoints``
(``checkpoint.dir``), written by :class:`specs_jax.training.checkpoint.Checkpointer`::

    CKPT_DIR/STEP/params/          {"trained": {...}, "frozen": {...}}: the only item read here
    CKPT_DIR/STEP/opt_state/       optimizer moments (never read here)
    CKPT_DIR/STEP/metrics/         the step's metrics, ranked by checkpoint.keep_best_metric
    CKPT_DIR/specs_jax_run.json    {"format": "specs-jax-run", "keep_best_metric", "best_mode", "model_files"}
    CKPT_DIR/model/                the run's model: config.json, and the tokenizer, processor,
                                   chat-template and generation-config files of the model it started from

A reference is ``CKPT_DIR/STEP`` or ``RUN`` / ``CKPT_DIR`` with a step: ``latest``, ``best`` (the
checkpoint kept by ``checkpoint.keep_best_metric``) or a number. Parameters are restored from Orbax
as host numpy arrays, one state entry at a time where it matters, on one CPU process whatever mesh
or number of processes wrote them. Paths go through ``etils.epath``, so ``gs://`` and other remote
paths work where Orbax supports them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from specs_jax.model.config import ModelConfig

__all__ = [
    "MODEL_DIR", "RUN_RECORD", "TrainingCheckpoint", "checkpoint_files_dir", "is_training_reference",
    "load_training_model", "resolve", "resolve_reference", "training_to_hf", "write_run_record",
]

RUN_RECORD = "specs_jax_run.json"
RUN_FORMAT = {"format": "specs-jax-run", "version": 1}
MODEL_DIR = "model"
PARAMS_ITEM = "params"
METRICS_ITEM = "metrics"
PARTS = ("trained", "frozen")  # the subtrees of the params item, joined into the model's parameters
STEP_CHOICES = "latest|best|N"


def _path(path: str | os.PathLike) -> Any:
    """An ``epath.Path`` (``gs://...`` kept intact; local paths made absolute)."""
    from etils import epath

    text = os.fspath(path)
    return epath.Path(text) if "://" in text else epath.Path(Path(text).absolute())


def _steps(directory: Any) -> list[int]:
    """Finalized Orbax checkpoint steps in ``directory`` (unfinished saves are not listed)."""
    from orbax.checkpoint.path import step as step_lib

    try:
        return sorted(step_lib.checkpoint_steps(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_checkpoint_dir(path: Any) -> bool:
    return path.is_dir() and ((path / RUN_RECORD).exists() or bool(_steps(path)))


def _is_step_dir(path: Any) -> bool:
    """An Orbax step directory with a params item (not a specs-jax Orbax model directory named N)."""
    return (path.name.isdigit() and (path / PARAMS_ITEM).is_dir() and (path / "_CHECKPOINT_METADATA").exists()
            and not (path / "specs_jax.json").exists())


def _checkpoint_dir(path: Any) -> Any | None:
    """The checkpoint directory of a run directory or of a checkpoint directory itself, else None."""
    for candidate in (path, path / "checkpoints"):
        if _is_checkpoint_dir(candidate):
            return candidate
    return None


def is_training_reference(path: str | os.PathLike) -> bool:
    """Whether ``path`` is ``CKPT_DIR/STEP``, a checkpoint directory or a run directory holding one."""
    p = _path(path)
    if not p.exists():
        return p.name.isdigit() and _checkpoint_dir(p.parent) is not None
    return _is_step_dir(p) or _checkpoint_dir(p) is not None


def _fmt_steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def _read_record(directory: Any) -> dict[str, Any] | None:
    file = directory / RUN_RECORD
    return json.loads(file.read_text()) if file.exists() else None


def _metrics(directory: Any, step: int) -> dict[str, Any] | None:
    file = directory / str(step) / METRICS_ITEM / METRICS_ITEM
    return json.loads(file.read_text()) if file.exists() else None


@dataclasses.dataclass(frozen=True)
class TrainingCheckpoint:
    """One step of a run's checkpoint directory."""

    directory: Any  # epath.Path of the checkpoint directory
    step: int

    @property
    def step_dir(self) -> Any:
        return self.directory / str(self.step)

    @property
    def params_dir(self) -> Any:
        return self.step_dir / PARAMS_ITEM

    @property
    def model_dir(self) -> Any | None:
        """The run's recorded model (config.json + tokenizer files), or None for runs without one."""
        d = self.directory / MODEL_DIR
        return d if (d / "config.json").exists() else None

    @property
    def record(self) -> dict[str, Any]:
        return _read_record(self.directory) or {}

    def __str__(self) -> str:
        return str(self.step_dir)


def _select(directory: Any, step: int | str | None, given: str) -> int:
    steps = _steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory} holds no checkpoints yet (no finished step directory)")
    if step is None:
        raise ValueError(f"{given} is a run with checkpoints at steps {_fmt_steps(steps)}; choose one with "
                         f"--step {STEP_CHOICES} (or give {directory}/STEP)")
    if step == "latest":
        return steps[-1]
    if step == "best":
        record = _read_record(directory) or {}
        metric, mode = record.get("keep_best_metric"), record.get("best_mode", "min")
        if metric is None:
            raise ValueError(f"{directory}: --step best needs the metric of checkpoint.keep_best_metric, which this "
                             f"run did not set (or did not record); existing steps: {_fmt_steps(steps)}")
        ranked = [(m[metric], s) for s in steps if (m := _metrics(directory, s)) is not None and metric in m]
        if not ranked:
            raise ValueError(f"{directory}: no checkpoint was saved with the metric {metric!r} "
                             f"(checkpoint.keep_best_metric); existing steps: {_fmt_steps(steps)}")
        return (min(ranked) if mode == "min" else max(ranked))[1]
    try:
        n = int(step)
    except (TypeError, ValueError):
        raise ValueError(f"--step {step!r}: expected {STEP_CHOICES}") from None
    if n not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint at step {n}; existing steps: {_fmt_steps(steps)}")
    return n


def resolve(path: str | os.PathLike, step: int | str | None = None) -> TrainingCheckpoint:
    """The checkpoint ``path`` refers to: ``CKPT_DIR/STEP``, or ``RUN`` / ``CKPT_DIR`` with ``step``
    (``"latest"``, ``"best"`` or a number). Errors name what is wrong and list the existing steps."""
    p = _path(path)
    if p.name.isdigit() and (p.exists() or _checkpoint_dir(p.parent) is not None) and not _checkpoint_dir(p):
        if step is not None and str(step) != p.name:
            raise ValueError(f"{path} already names step {p.name}; drop --step {step} (or give the run directory)")
        directory = p.parent
        if not _is_checkpoint_dir(directory) and not _is_step_dir(p):
            raise FileNotFoundError(f"{path}: not a training checkpoint (no {PARAMS_ITEM}/ item)")
        return TrainingCheckpoint(directory, _select(directory, int(p.name), str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    directory = _checkpoint_dir(p)
    if directory is None:
        if (p / "checkpoints").is_dir():
            raise FileNotFoundError(f"{p / 'checkpoints'} holds no checkpoints yet (no finished step directory)")
        raise FileNotFoundError(
            f"{path}: no training checkpoints (expected {p}/checkpoints/STEP as written by `specs-jax train ... "
            f"train.output_dir={path}`, or a checkpoint directory of step directories)")
    return TrainingCheckpoint(directory, _select(directory, step, str(path)))


def resolve_reference(path: str | os.PathLike, step: int | str | None = None) -> str:
    """``path`` itself for model directories; for a training reference, its step directory
    (``latest``/``best`` resolved), so that the model and its processor come from the same place."""
    from specs_jax.convert.io import _is_hf_dir, _is_orbax_dir

    local = Path(path)
    if "://" not in os.fspath(path) and (_is_hf_dir(local) or _is_orbax_dir(local)):
        if step is not None:
            raise ValueError(f"--step is for training checkpoints; {path} is a model directory")
        return os.fspath(path)
    if step is None and not is_training_reference(path):
        return os.fspath(path)
    return str(resolve(path, step))


def checkpoint_files_dir(path: str | os.PathLike) -> Any | None:
    """The recorded model directory (config + tokenizer files) of a training reference (any step or
    none), else None."""
    p = _path(path)
    if _is_step_dir(p) or (p.name.isdigit() and not p.exists()):
        p = p.parent
    directory = _checkpoint_dir(p) if p.exists() else None
    if directory is None:
        return None
    return directory / MODEL_DIR


# --------------------------------------------------------------------------------------------
# Writing the run record (the trainer's Checkpointer, on its first save)
# --------------------------------------------------------------------------------------------

def write_run_record(directory: str | os.PathLike, model: ModelConfig | None, model_files: str | os.PathLike | None,
                     keep_best_metric: str | None, best_mode: str) -> None:
    """Record in a checkpoint directory what turns its steps into models: the model's HF config, the
    tokenizer/processor/chat-template/generation-config files of ``model_files`` (a model directory
    or training reference, copied so the run stays convertible when the source moves), and the
    ``keep_best_metric`` ranking the checkpoints."""
    from specs_jax.convert.io import CARRIED_FILES

    d = _path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if model is not None:
        out = d / MODEL_DIR
        out.mkdir(parents=True, exist_ok=True)  # a resumed run keeps the files it recorded before
        (out / "config.json").write_text(json.dumps(model.hf_config, indent=2))
        if model_files is not None:
            src = checkpoint_files_dir(model_files) or _path(model_files)
            if src.is_dir():
                for f in src.iterdir():
                    if f.name != "config.json" and CARRIED_FILES.match(f.name) and not f.is_dir():
                        (out / f.name).write_bytes(f.read_bytes())
    record = {**RUN_FORMAT, "keep_best_metric": keep_best_metric, "best_mode": best_mode,
              "model_files": None if model_files is None else os.fspath(model_files)}
    (d / RUN_RECORD).write_text(json.dumps(record, indent=2))


# --------------------------------------------------------------------------------------------
# Reading parameters
# --------------------------------------------------------------------------------------------

def _key(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_metadata(ref: TrainingCheckpoint) -> dict[str, Any]:
    """``{state path: ArrayMetadata}`` of the step's parameters (trained and frozen joined), from
    the Orbax metadata alone (no array is read)."""
    import jax

    from specs_jax.convert.io import _checkpointer

    with _checkpointer(0) as ckpt:
        tree = ckpt.metadata(ref.params_dir).item_metadata.tree
    unknown = sorted(set(tree) - set(PARTS))
    if unknown:
        raise ValueError(f"{ref.params_dir}: unexpected items {unknown}; expected {list(PARTS)}")
    out: dict[str, Any] = {}
    for part in PARTS:
        for path, meta in jax.tree_util.tree_leaves_with_path(tree.get(part) or {}):
            key = _key(path)
            if key in out:
                raise ValueError(f"{ref.params_dir}: parameter {key} is both trained and frozen")
            out[key] = (part, path, meta)
    return out


def _nested(path: tuple, leaf: Any) -> dict:
    for k in reversed(path):
        leaf = {getattr(k, "key", k): leaf}
    return leaf


def _restore(ref: TrainingCheckpoint, entries: list[tuple[str, tuple, Any]], largest: int) -> list[np.ndarray]:
    """Restore the given ``(part, path, metadata)`` leaves of the params item as host numpy arrays
    (Orbax partial restore: nothing else is read, whatever the writer's mesh)."""
    import orbax.checkpoint as ocp

    from specs_jax.convert.io import _checkpointer

    item: dict = {}
    restore_args: dict = {}

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict):
                merge(dst.setdefault(k, {}), v)
            else:
                dst[k] = v

    for part, path, meta in entries:
        merge(item, {part: _nested(path, np.zeros((), np.dtype(meta.dtype)))})
        merge(restore_args, {part: _nested(path, ocp.RestoreArgs(restore_type=np.ndarray))})
    with _checkpointer(largest) as ckpt:
        out = ckpt.restore(ref.params_dir, args=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                                                          restore_args=restore_args))
    arrays = []
    for part, path, _ in entries:
        node = out[part]
        for k in path:
            node = node[getattr(k, "key", k)]
        arrays.append(node)
    return arrays


def _nbytes(meta: Any) -> int:
    return int(np.prod(meta.shape, dtype=np.int64)) * np.dtype(meta.dtype).itemsize


def _model_source(ref: TrainingCheckpoint, model: str | os.PathLike | ModelConfig | None,
                  **options: Any) -> tuple[ModelConfig, str, Any | None]:
    """(config, where it came from, directory of tokenizer files or None) of the checkpoint's model:
    ``model`` (a ModelConfig, a model directory or another training reference) or the run's record."""
    from specs_jax.model.config import from_hf_dict

    if isinstance(model, ModelConfig):
        return from_hf_dict(model.hf_config, **options), "the given model config", ref.model_dir
    if model is not None:
        src = checkpoint_files_dir(model) or _path(model)
        if not (src / "config.json").exists():
            raise FileNotFoundError(f"--model {model}: no config.json (expected the directory of the model the run "
                                    "trained, or another run's checkpoint)")
        return from_hf_dict(json.loads((src / "config.json").read_text()), **options), str(src / "config.json"), src
    if ref.model_dir is None:
        raise FileNotFoundError(
            f"{ref.directory}: the run records no model ({MODEL_DIR}/config.json is missing: checkpoints written "
            f"before specs-jax recorded the run's model); pass the model the run started from with --model DIR "
            f"(model=...)")
    cfg = from_hf_dict(json.loads((ref.model_dir / "config.json").read_text()), **options)
    return cfg, str(ref.model_dir / "config.json"), ref.model_dir


def _check(ref: TrainingCheckpoint, cfg: ModelConfig, where: str, meta: dict[str, Any]) -> None:
    from specs_jax.convert.io import check_tensors, hf_names

    shapes = {n: s for k, (_, _, m) in meta.items() for n, s in hf_names(k, tuple(m.shape))}
    check_tensors(cfg, shapes, what=f"checkpoint {ref.step_dir} does not match the model config {where}")


def load_training_params(ref: TrainingCheckpoint, cfg: ModelConfig, where: str) -> dict[str, np.ndarray]:
    """``{state path: numpy array}`` of all parameters of the step, after checking them against ``cfg``."""
    meta = param_metadata(ref)
    _check(ref, cfg, where, meta)
    keys = list(meta)
    arrays = _restore(ref, [meta[k] for k in keys], max(_nbytes(m) for _, _, m in meta.values()))
    return dict(zip(keys, arrays))


def load_training_model(path: str | os.PathLike, step: int | str | None = None, *, dtype: str = "float32",
                        param_dtype: str | None = None, remat: str = "none", attention: str = "auto",
                        mlp_tile: int = 0, model: str | os.PathLike | ModelConfig | None = None):
    """The model of one step of a run (see :func:`resolve` for ``path`` and ``step``)."""
    from specs_jax.convert.io import _build

    ref = resolve(path, step)
    cfg, where, _ = _model_source(ref, model, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention,
                                  mlp_tile=mlp_tile)
    return _build(cfg, load_training_params(ref, cfg, where))


# --------------------------------------------------------------------------------------------
# Conversion to HF
# --------------------------------------------------------------------------------------------

def training_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, step: int | str | None = None,
                   dtype: str | None = None, model: str | os.PathLike | ModelConfig | None = None,
                   overwrite: bool = False, max_shard_bytes: int | None = None) -> Path:
    """Write one step of a run as an HF model directory: trained and frozen parameters joined, cast
    to ``dtype`` (default: the stored dtype, bit-exact), plus the run's tokenizer, processor, chat
    template and generation config. Streams: each state entry is restored on its own (Orbax partial
    restore of the ``params`` item; the optimizer state is never opened), its tensors written, then
    dropped."""
    from specs_jax.convert.io import (MAX_SHARD_BYTES, _config_with_dtype, _np_dtype, atomic_output_dir, hf_plan,
                                      write_hf_weights)

    ref = resolve(path, step)
    cfg, where, files = _model_source(ref, model)
    meta = param_metadata(ref)
    _check(ref, cfg, where, meta)
    to = _np_dtype(dtype)
    stored = {np.dtype(m.dtype) for _, _, m in meta.values()}
    plan = hf_plan(cfg, {k: to or np.dtype(m.dtype) for k, (_, _, m) in meta.items()})
    largest = max(_nbytes(m) for _, _, m in meta.values())

    def fetch(key: str) -> np.ndarray:
        return _restore(ref, [meta[key]], largest)[0]

    # config.json states the dtype of the tensors written (the run's config may name another)
    out_dtype = dtype or (str(next(iter(stored))) if len(stored) == 1 else None)
    hf_config = _config_with_dtype(cfg.hf_config, out_dtype)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_hf_weights(tmp, plan, fetch, max_shard_bytes or MAX_SHARD_BYTES, cast=to)
        if files is not None:
            _carry(files, tmp)
    return Path(out_dir)


def _carry(src: Any, dst: Path) -> None:
    from specs_jax.convert.io import CARRIED_FILES

    for f in src.iterdir():
        if f.name != "config.json" and CARRIED_FILES.match(f.name) and not f.is_dir():
            (dst / f.name).write_bytes(f.read_bytes())

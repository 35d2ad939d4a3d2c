"""Run configuration: dataclasses, loaded MaxText-style from YAML plus ``key=value`` overrides.

Loading order (later wins)::

    configs/base.yaml          every default, for reference (equal to the dataclass defaults)
    configs/STAGE.yaml         names its base with ``base_config: base.yaml`` (relative path)
    key=value ...              dotted keys, e.g. ``optim.lr=1e-6 train.steps=10``

Every key is checked against the dataclasses: an unknown key is refused with a suggestion
(``unknown config key 'optim.lrr' (did you mean 'optim.lr'?)``) and a value of the wrong type
with the key named (``config key 'train.steps' expects int, got 'abc'``). Values given as strings
(YAML 1.1 reads ``1e-6`` as a string, command-line values are strings) are parsed as YAML and
then coerced to the field's type. Fields typed ``dict`` (``loss.kwargs``, ``mesh.rules``) take
any keys; ``loss.kwargs`` is checked against the loss function's signature when the trainer builds it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "LogConfig", "LossConfig", "MeshConfig", "ModelSection",
    "OptimConfig", "RLConfig", "RunConfig", "TrainConfig", "apply_overrides", "from_dict", "load_config", "to_dict",
]


class ConfigError(ValueError):
    """A run config with an unknown key, a value of the wrong type or an invalid setting."""


@dataclasses.dataclass
class ModelSection:
    """The policy to train: an HF/Orbax directory (``path``) or a random model from ``preset``."""

    path: str | None = None
    preset: str = "tiny"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"  # auto | xla | splash | cudnn | blockwise (specs_jax.model.attention)
    mlp_tile: int = 0  # > 0: the decoder MLP over tiles of this many positions, each rematerialised
    freeze_vision: bool = False
    reference: str = "batch"  # DPO reference log-probs: "batch" (frozen copy, per batch) | "precomputed"

    def options(self) -> dict[str, Any]:
        """The model's run-time options (dtypes, remat, attention backend, MLP tile), as keywords of
        ``load_model``, ``load_preset`` and ``from_hf_dict``."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype, "remat": self.remat,
                "attention": self.attention, "mlp_tile": self.mlp_tile}


@dataclasses.dataclass
class MeshConfig:
    """Device mesh ``data x fsdp x tensor`` (-1: all remaining devices) and logical-axis rules.

    ``rules`` maps a logical axis name to a mesh axis, a list of mesh axes or null (replicated);
    it is merged over :data:`specs_jax.training.sharding.DEFAULT_RULES`.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict = dataclasses.field(default_factory=dict)
    distributed: bool = False  # call jax.distributed.initialize() when a multi-host job is detected
    coordinator_address: str | None = None  # explicit multi-process job: "host:port" of process 0
    num_processes: int | None = None  # explicit: processes of the job (with coordinator_address)
    process_id: int | None = None  # explicit: this process's index, 0 .. num_processes - 1
    heartbeat_timeout_s: int = 100  # a process silent this long is declared dead: the others stop with an error


@dataclasses.dataclass
class OptimConfig:
    """AdamW with global-norm clipping and a warmup + constant/cosine/linear schedule."""

    lr: float = 1e-6
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr / lr for cosine and linear decay
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    grad_accum_steps: int = 1


@dataclasses.dataclass
class TrainConfig:
    steps: int = 10
    batch_size: int = 8  # global batch (sequences or preference pairs) per optimizer step
    max_length: int = 64
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: no evaluation
    output_dir: str = "runs/train"


@dataclasses.dataclass
class CheckpointConfig:
    dir: str | None = None  # default: OUTPUT_DIR/checkpoints
    every: int = 0  # 0: only at the end
    keep_last_n: int = 3
    keep_best_metric: str | None = None  # e.g. "eval/loss": also keep the best checkpoint by it
    best_mode: str = "min"  # min | max
    async_save: bool = True


@dataclasses.dataclass
class LossConfig:
    """The training kind's loss: ``name`` any registered loss that fits the kind (null: the kind's default,
    e.g. ``dpo_hybrid`` for ``train dpo``, ``grpo`` for ``train grpo``), ``kwargs`` its options."""

    name: str | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LogConfig:
    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "specs-jax"
    progress: bool = True


@dataclasses.dataclass
class DataConfig:
    """Where batches come from. ``synthetic``: random token ids (tests, smoke runs); ``files``: the
    datasets + grain pipeline of :mod:`specs_jax.data.pipeline` over ``train_path`` (``sft_batches`` for
    SFT, ``preference_batches`` for DPO), tokenised by the processor in ``processor`` (default:
    ``model.path``), padded to the smallest of ``buckets`` (default: ``[train.max_length]``)."""

    source: str = "synthetic"
    train_path: str | None = None  # files: parquet / jsonl / json / csv
    eval_path: str | None = None  # files: held-out rows evaluated every train.eval_every steps
    processor: str | None = None  # files: tokenizer + image processor directory
    image_root: str | None = None  # files: directory of relative image paths
    buckets: list = dataclasses.field(default_factory=list)  # files: padded lengths (increasing)
    columns: dict = dataclasses.field(default_factory=dict)  # files: role -> column name (pipeline.Columns)
    format: str = "auto"  # files: auto | flat | mm_eureka | easyr1 | verl | trl | sharegpt (data.formats)
    system_prompt: str | None = None  # files: system message of every prompt (null: the template's default)
    override_data_system: bool = False  # files: true: system_prompt replaces system messages found in the data
    response_fraction: float = 0.5  # synthetic: share of each row that is response
    num_batches: int = 0  # synthetic: cycle over this many distinct batches (1: a fixed batch); 0: endless
    image_grid: list = dataclasses.field(default_factory=list)  # synthetic: [t, h, w] patches of one image per row
    eval_batches: int = 2  # synthetic: held-out batches evaluated every train.eval_every steps


@dataclasses.dataclass
class RLConfig:
    """Rollouts of the RL stages (``train grpo``, ``opsd``, ``vigos``): ``train.batch_size`` prompts per
    step, ``group_size`` samples each, ``num_iterations`` optimizer updates per rollout batch."""

    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_iterations: int = 1
    scale_rewards: str | None = None  # group | batch | none (METHOD.md section 4); null: the loss's (group; dr_grpo: none)
    accuracy_filter: list = dataclasses.field(default_factory=list)  # [lo, hi]: mask groups outside; []: off
    # rollout engine (specs_jax.sampling.engine): decode slots = concurrent sequences, at most max_slots and as
    # many as fit kv_cache_gib GiB of KV cache per device (null/null: half a device's free memory; no cap on CPU)
    max_slots: int | None = None
    kv_cache_gib: float | None = None
    rollout_mesh: str = "auto"  # weight layout of the rollout (sampling.layout): trainer | auto | tensor size K


@dataclasses.dataclass
class EvalConfig:
    """``specs-jax eval`` and the pipeline's evaluation: greedy accuracy and format rate, and pass@k
    from ``num_samples`` samples at ``temperature``, on each named split file."""

    splits: dict = dataclasses.field(default_factory=dict)  # split name -> parquet/jsonl path
    max_examples: int = 0  # per split; 0: all rows
    num_samples: int = 8
    ks: list = dataclasses.field(default_factory=lambda: [1, 4, 8])
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 32  # prompts per sampler call


@dataclasses.dataclass
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)


CHOICES = {
    "model.reference": ("batch", "precomputed"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("auto", "xla", "splash", "cudnn", "blockwise"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "checkpoint.best_mode": ("min", "max"),
    "data.source": ("synthetic", "files"),
    "rl.scale_rewards": (None, "group", "batch", "none"),
    "data.format": ("auto", "flat", "mm_eureka", "easyr1", "verl", "trl", "sharegpt"),
}
POSITIVE = ("train.steps", "train.batch_size", "train.max_length", "train.log_every", "optim.grad_accum_steps",
            "checkpoint.keep_last_n", "data.eval_batches", "rl.group_size", "rl.max_new_tokens",
            "rl.num_iterations", "eval.num_samples", "eval.max_new_tokens", "eval.batch_size")
NON_NEGATIVE = ("optim.warmup_steps", "train.eval_every", "checkpoint.every", "data.num_batches",
                "rl.temperature", "rl.top_k", "eval.max_examples", "eval.temperature", "model.mlp_tile")


def validate(cfg: RunConfig) -> None:
    """Check choices and ranges; ``ConfigError`` naming the key otherwise."""
    flat = _flatten(to_dict(cfg))
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"config key {key!r} must be one of {list(choices)}, got {flat[key]!r}")
    for key in POSITIVE:
        if flat[key] < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {flat[key]}")
    explicit = (cfg.mesh.coordinator_address, cfg.mesh.num_processes, cfg.mesh.process_id)
    if any(x is not None for x in explicit) and any(x is None for x in explicit):
        raise ConfigError("config keys 'mesh.coordinator_address', 'mesh.num_processes' and 'mesh.process_id' go "
                          f"together (set all three or none), got {explicit}")
    if cfg.mesh.num_processes is not None and not 0 <= cfg.mesh.process_id < cfg.mesh.num_processes:
        raise ConfigError(f"config key 'mesh.process_id' must be in [0, mesh.num_processes={cfg.mesh.num_processes}), "
                          f"got {cfg.mesh.process_id}")
    if cfg.train.batch_size % cfg.optim.grad_accum_steps:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"optim.grad_accum_steps={cfg.optim.grad_accum_steps}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {flat[key]}")
    if cfg.data.source == "files":
        if cfg.data.train_path is None:
            raise ConfigError("config key 'data.train_path' is required with data.source=files")
        if cfg.data.processor is None and cfg.model.path is None:
            raise ConfigError("config key 'data.processor' is required with data.source=files when model.path "
                              "is null (the processor is read from the model directory otherwise)")
    from specs_jax.data.pipeline import Columns

    roles = {f.name for f in dataclasses.fields(Columns)}
    unknown_roles = sorted(set(cfg.data.columns) - roles)
    if unknown_roles:
        raise ConfigError(f"config key 'data.columns' has unknown role(s) {unknown_roles}; roles: {sorted(roles)}")
    grid = cfg.data.image_grid
    if grid and (len(grid) != 3 or not all(isinstance(g, int) and g > 0 for g in grid)):
        raise ConfigError(f"config key 'data.image_grid' must be [] or three positive ints [t, h, w], got {grid}")
    band = cfg.rl.accuracy_filter
    if band and (len(band) != 2 or not 0 <= band[0] <= band[1] <= 1):
        raise ConfigError(f"config key 'rl.accuracy_filter' must be [] or [lo, hi] with 0 <= lo <= hi <= 1, got {band}")
    if cfg.rl.max_slots is not None and cfg.rl.max_slots < 1:
        raise ConfigError(f"config key 'rl.max_slots' must be null or >= 1, got {cfg.rl.max_slots}")
    if cfg.rl.kv_cache_gib is not None and cfg.rl.kv_cache_gib <= 0:
        raise ConfigError(f"config key 'rl.kv_cache_gib' must be null or > 0, got {cfg.rl.kv_cache_gib}")
    from specs_jax.sampling.layout import parse_rollout_mesh

    try:
        parse_rollout_mesh(cfg.rl.rollout_mesh)
    except ValueError as e:
        raise ConfigError(f"config key {e}") from None
    if not 0 < cfg.rl.top_p <= 1:
        raise ConfigError(f"config key 'rl.top_p' must be in (0, 1], got {cfg.rl.top_p}")
    bad_k = [k for k in cfg.eval.ks if not isinstance(k, int) or not 1 <= k <= cfg.eval.num_samples]
    if bad_k:
        raise ConfigError(f"config key 'eval.ks' must hold ints in [1, eval.num_samples={cfg.eval.num_samples}], "
                          f"got {cfg.eval.ks}")
    for key in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
        if flat[key] == 0 or flat[key] < -1:
            raise ConfigError(f"config key {key!r} must be a positive size or -1 (fill), got {flat[key]}")


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks
# --------------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("rules", "kwargs", "splits", "columns"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        keys.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{f.name}.")
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(RunConfig), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int, float, str, bool, dict, or ``X | None``); strings are parsed as YAML."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        (tp,) = [a for a in args if a is not type(None)]
    name = getattr(tp, "__name__", str(tp))
    bad = ConfigError(f"config key {key!r} expects {name}, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise bad from None
        if tp is float and isinstance(parsed, str):
            try:
                return float(parsed)
            except ValueError:
                raise bad from None
        value = parsed
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    if tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad
    raise TypeError(f"config field {key!r} has unsupported type {tp}")


def build_dataclass(cls: type, d: dict, prefix: str = "") -> Any:
    """``cls(**d)`` for a (nested) config dataclass, every key and type checked (``ConfigError`` naming
    ``prefix + key`` otherwise)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config key {prefix[:-1]!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise _unknown(f"{prefix}{k}")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        kwargs[k] = (build_dataclass(tp, v, f"{prefix}{k}.") if dataclasses.is_dataclass(tp)
                     else _coerce(f"{prefix}{k}", v, tp))
    return cls(**kwargs)


def from_dict(d: dict) -> RunConfig:
    """A :class:`RunConfig` from a nested dict (missing keys take the defaults)."""
    return build_dataclass(RunConfig, d, "")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping, got {type(data).__name__}")
    base = data.pop("base_config", None)
    if base is None:
        return data
    return deep_merge(read_yaml(path.parent / base), data)


def _parse_free(value: str) -> Any:
    """A value of a free-form dict entry: YAML, with ``1e-6``-style floats read as floats."""
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


FREE_DICTS = ("loss.kwargs", "mesh.rules", "eval.splits", "data.columns")  # dict-typed fields: any sub-key


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` strings (dotted keys) to a nested dict; unknown keys are refused."""
    d = deep_merge({}, d)
    known = set(_all_keys(RunConfig))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        parts = key.split(".")
        if key not in known and ".".join(parts[:2]) not in FREE_DICTS:
            raise _unknown(key)
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_free(value) if ".".join(parts[:2]) in FREE_DICTS else value
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a stage YAML (following its ``base_config`` chain), apply overrides, check everything."""
    d = read_yaml(Path(path)) if path is not None else {}
    return from_dict(apply_overrides(d, list(overrides or [])))

"""Qwen2.5-VL architecture config: parsed from / written back to an HF ``config.json`` dict.

The HF dict is kept verbatim in :attr:`ModelConfig.hf_config` so that a round trip
HF -> Orbax -> HF writes back exactly the config it read. Both the flat layout of the
published Qwen checkpoints (text fields at the top level, ``rope_scaling``) and the
nested layout of transformers >= 5 (``text_config``, ``rope_parameters``) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"
PRESET_DIR = Path(__file__).resolve().parents[2] / "models"


class ConfigError(ValueError):
    """A config that does not describe a supported Qwen2.5-VL model."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    tokens_per_second: int = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * P * P (the processor's pixel_values width)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from the HF config) plus run-time options (dtypes, rematerialisation).

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of parameters
    (e.g. bf16 compute with fp32 master weights). ``remat`` is the rematerialisation policy
    of the scanned decoder layers: ``none``, ``full`` (save nothing) or ``dots`` (save
    matmul outputs without batch dimensions). ``attention`` is the attention backend of
    :mod:`specs_jax.model.attention`: ``auto`` (splash on TPU, cudnn on GPU, blockwise
    elsewhere), ``xla`` (the dense-mask reference), ``splash``, ``cudnn`` or ``blockwise``.
    ``mlp_tile`` (0: off) runs the decoder's MLP over tiles of that many positions, each under
    ``jax.checkpoint`` (:func:`specs_jax.model.layers.sequence_tiled`): its ``[B, T, intermediate]``
    activations exist for one tile at a time, for one more MLP forward (long sequences).
    """

    vision: VisionConfig
    text: TextConfig
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    hf_config: dict[str, Any] = dataclasses.field(compare=False, repr=False)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    mlp_tile: int = 0

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_BACKENDS = ("auto", "xla", "splash", "cudnn", "blockwise")  # = specs_jax.model.attention.BACKENDS
DTYPES = ("float32", "bfloat16", "float16")


def _pick(d: dict[str, Any], key: str, *fallbacks: dict[str, Any], default: Any = None) -> Any:
    for src in (d, *fallbacks):
        if key in src and src[key] is not None:
            return src[key]
    return default


def _required(d: dict[str, Any], key: str, where: str, *fallbacks: dict[str, Any]) -> Any:
    value = _pick(d, key, *fallbacks)
    if value is None:
        raise ConfigError(f"config.json: missing required field {where}{key!r}")
    return value


def from_hf_dict(hf: dict[str, Any], *, dtype: str = "float32", param_dtype: str | None = None,
                 remat: str = "none", attention: str = "auto", mlp_tile: int = 0) -> ModelConfig:
    """Parse an HF ``Qwen2_5_VLConfig`` dict (flat or nested layout) into a :class:`ModelConfig`."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
        raise ConfigError(
            f"config.json describes model_type={model_type!r}, architectures={archs!r}; "
            f"specs-jax supports only {MODEL_TYPE!r} ({ARCHITECTURE})"
        )
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype or dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{name}={value!r} is not one of {DTYPES}")
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat={remat!r} is not one of {REMAT_POLICIES}")
    if attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention={attention!r} is not one of {ATTENTION_BACKENDS}")
    if not isinstance(mlp_tile, int) or mlp_tile < 0:
        raise ConfigError(f"mlp_tile={mlp_tile!r} must be an integer >= 0 (0: the MLP is not tiled)")

    text = dict(hf.get("text_config") or {})
    vis = dict(hf.get("vision_config") or {})
    if not vis:
        raise ConfigError("config.json: missing 'vision_config'")
    rope = _pick(text, "rope_parameters", hf) or _pick(text, "rope_scaling", hf) or {}
    mrope = rope.get("mrope_section")
    if mrope is None:
        raise ConfigError("config.json: rope_scaling/rope_parameters has no 'mrope_section'")
    heads = int(_required(text, "num_attention_heads", "", hf))
    text_cfg = TextConfig(
        vocab_size=int(_required(text, "vocab_size", "", hf)),
        hidden_size=int(_required(text, "hidden_size", "", hf)),
        intermediate_size=int(_required(text, "intermediate_size", "", hf)),
        num_hidden_layers=int(_required(text, "num_hidden_layers", "", hf)),
        num_attention_heads=heads,
        num_key_value_heads=int(_pick(text, "num_key_value_heads", hf, default=heads)),
        mrope_section=tuple(int(x) for x in mrope),
        rms_norm_eps=float(_pick(text, "rms_norm_eps", hf, default=1e-6)),
        rope_theta=float(rope.get("rope_theta") or _pick(text, "rope_theta", hf, default=1_000_000.0)),
        hidden_act=str(_pick(text, "hidden_act", hf, default="silu")),
    )
    if 2 * sum(text_cfg.mrope_section) != text_cfg.head_dim:
        raise ConfigError(
            f"mrope_section {list(text_cfg.mrope_section)} sums to {sum(text_cfg.mrope_section)}, "
            f"expected head_dim/2 = {text_cfg.head_dim // 2}"
        )
    vis_rope = vis.get("rope_parameters") or {}
    vision_cfg = VisionConfig(
        depth=int(_required(vis, "depth", "vision_config.")),
        hidden_size=int(_required(vis, "hidden_size", "vision_config.")),
        intermediate_size=int(_required(vis, "intermediate_size", "vision_config.")),
        num_heads=int(_required(vis, "num_heads", "vision_config.")),
        out_hidden_size=int(_pick(vis, "out_hidden_size", default=text_cfg.hidden_size)),
        fullatt_block_indexes=tuple(int(i) for i in vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
        hidden_act=str(vis.get("hidden_act", "silu")),
        in_channels=int(_pick(vis, "in_channels", default=vis.get("in_chans", 3))),
        patch_size=int(vis.get("patch_size", 14)),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        window_size=int(vis.get("window_size", 112)),
        tokens_per_second=int(vis.get("tokens_per_second", 2)),
        rope_theta=float(vis_rope.get("rope_theta", 10000.0)),
    )
    if vision_cfg.out_hidden_size != text_cfg.hidden_size:
        raise ConfigError(
            f"vision_config.out_hidden_size={vision_cfg.out_hidden_size} != text hidden_size={text_cfg.hidden_size}"
        )
    tie = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings") or False)
    return ModelConfig(
        vision=vision_cfg,
        text=text_cfg,
        tie_word_embeddings=tie,
        image_token_id=int(hf.get("image_token_id", 151655)),
        video_token_id=int(hf.get("video_token_id", 151656)),
        vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
        hf_config=hf,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        remat=remat,
        attention=attention,
        mlp_tile=mlp_tile,
    )


def load_config(path: str | Path, **options: Any) -> ModelConfig:
    """Read ``config.json`` from a directory (or the file itself) and parse it."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file}")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    return from_hf_dict(hf, **options)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str, **options: Any) -> ModelConfig:
    """Load an architecture preset from ``models/NAME.json`` (e.g. ``qwen2.5-vl-7b``, ``tiny``)."""
    file = PRESET_DIR / f"{name}.json"
    if not file.is_file():
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(list_presets())}")
    return load_config(file, **options)

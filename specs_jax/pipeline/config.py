"""Pipeline configuration: one YAML for the whole SPECS run (and its ablation), MaxText style.

A pipeline YAML may name a parent with ``base_config:`` (e.g. the ablation config extends
``specs_tiny.yaml``) and is overridden by dotted ``key=value`` strings. Sections:

- ``run_dir``, ``seed``, ``system_prompt`` (the format instruction of every prompt);
- ``synth``: the synthetic dataset (:class:`specs_jax.data.synth.SynthConfig` fields);
- ``base``: the tiny base model (:class:`~specs_jax.pipeline.base_model.BaseModelConfig`);
- ``common``: run-config overrides (sections of ``configs/base.yaml``) of every training stage;
- ``grpo_zero``, ``cold_start``, ``grpo_final``: run-config overrides of each stage (over
  ``common``); ``cold_start.kind`` is ``dpo`` (DPO-hybrid), ``sft`` or ``none`` (skipped);
- ``pairs``: the self-distilled pairs (:class:`specs_jax.data.pair_sampling.PairsConfig`);
- ``eval``: the evaluation (``EvalConfig`` fields of the run config), ``gf_points``: cold-start
  checkpoints evaluated for the GF curve, ``rbf``: rollout counts of the RBF measurement;
- ``ablation``: ``seeds`` and ``variants`` (name -> ``cold_start`` overrides); absent: one run.

Paths, model directories and data files of the stages are set by the pipeline itself.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from specs_jax.data.pair_sampling import PairsConfig
from specs_jax.training.config import (
    ConfigError,
    RunConfig,
    build_dataclass,
    deep_merge,
    read_yaml,
    from_dict,
)

__all__ = ["AblationConfig", "PipelineConfig", "load_pipeline_config", "stage_config"]


@dataclasses.dataclass
class AblationConfig:
    """Seeds and cold-start variants (name -> ``cold_start`` overrides). Empty: the single SPECS run."""

    seeds: list = dataclasses.field(default_factory=list)
    variants: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PipelineConfig:
    run_dir: str = "runs/specs_tiny"
    seed: int = 0
    system_prompt: str = ("Think step by step inside <think> </think>, then give the final answer as "
                          "\\boxed{} inside <answer> </answer>.")
    synth: dict = dataclasses.field(default_factory=dict)
    base: dict = dataclasses.field(default_factory=dict)
    common: dict = dataclasses.field(default_factory=dict)
    grpo_zero: dict = dataclasses.field(default_factory=dict)
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    cold_start: dict = dataclasses.field(default_factory=lambda: {"kind": "dpo"})
    grpo_final: dict = dataclasses.field(default_factory=dict)
    eval: dict = dataclasses.field(default_factory=dict)
    gf_points: int = 4
    rbf: list = dataclasses.field(default_factory=lambda: [120, 240, 480])
    ablation: AblationConfig = dataclasses.field(default_factory=AblationConfig)

    def __post_init__(self) -> None:
        from specs_jax.data.synth import SynthConfig
        from specs_jax.pipeline.base_model import BaseModelConfig

        for key, cls in (("synth", SynthConfig), ("base", BaseModelConfig)):
            try:
                cls(**getattr(self, key))
            except TypeError as e:
                raise ConfigError(f"pipeline key {key!r}: {e}") from None
        for name, overrides in [("cold_start", self.cold_start),
                                *((f"ablation.variants.{k}", v) for k, v in self.ablation.variants.items())]:
            kind = overrides.get("kind", "dpo") if isinstance(overrides, dict) else None
            if kind not in ("dpo", "sft", "none"):
                raise ConfigError(f"pipeline key '{name}.kind' must be dpo, sft or none, got {kind!r}")
        # every stage's run config must load now, not after an hour of training
        for stage in ("base", "grpo_zero", "cold_start", "grpo_final"):
            stage_config(self, stage)
        for name, overrides in self.ablation.variants.items():
            stage_config(self, "cold_start", overrides)
        if self.gf_points < 1:
            raise ConfigError(f"pipeline key 'gf_points' must be >= 1, got {self.gf_points}")

    @property
    def seeds(self) -> list[int]:
        return list(self.ablation.seeds) or [self.seed]

    @property
    def variants(self) -> dict[str, dict]:
        """Cold-start variants: name -> ``cold_start`` section (``{"specs": cold_start}`` without ablation)."""
        if not self.ablation.variants:
            return {"specs": self.cold_start}
        return {k: deep_merge(self.cold_start, v) for k, v in self.ablation.variants.items()}


def stage_config(cfg: PipelineConfig, stage: str, variant: dict | None = None, **paths: Any) -> RunConfig:
    """The run config of ``stage`` (``base``: the base model's SFT, section ``base.train``):
    ``configs/base.yaml`` defaults, ``common``, the stage's section (for ``cold_start``: merged with
    ``variant``), then the pipeline's ``paths`` (``section__key=value``)."""
    section = copy.deepcopy(cfg.base.get("train", {}) if stage == "base" else getattr(cfg, stage))
    if variant is not None:
        section = deep_merge(section, variant)
    if section.pop("kind", None) == "sft":
        section.pop("loss", None)  # SFT is token-mean NLL: the DPO loss options do not apply
    d = deep_merge(copy.deepcopy(cfg.common), section)
    for key, value in paths.items():
        node = d
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"pipeline section {stage!r}: {e}") from None


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML (following ``base_config``), apply dotted ``key=value`` overrides, check it."""
    import yaml

    d = read_yaml(Path(path))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return build_dataclass(PipelineConfig, d, "")

"""The SPECS pipeline: data -> base model -> GRPO-zero -> pairs -> cold start -> final GRPO -> eval -> report."""

from specs_jax.pipeline.config import PipelineConfig, load_pipeline_config, stage_config
from specs_jax.pipeline.run import build_base, run_pipeline

__all__ = ["PipelineConfig", "build_base", "load_pipeline_config", "run_pipeline", "stage_config"]

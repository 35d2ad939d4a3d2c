"""``specs-jax pipeline --config configs/specs_tiny.yaml [key=value ...]``: every SPECS stage, then the report."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run the SPECS pipeline (all stages, resumable) and write its report",
                       description="Run the SPECS recipe end to end from one YAML: synthetic data, a tiny base "
                                   "model, GRPO-zero, self-distilled format-preference pairs, the DPO-hybrid cold "
                                   "start, final GRPO, evaluation on the ID and OOD splits, and report.md with "
                                   "plots in the run directory. A finished stage is not redone: run the same "
                                   "command again after an interruption. With an `ablation:` section (e.g. "
                                   "configs/specs_tiny_ablation.yaml) every cold-start variant and seed runs.")
    p.add_argument("--config", required=True, nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                   help="pipeline YAML, then dotted overrides, e.g. run_dir=runs/x grpo_zero.train.steps=5")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from specs_jax.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(args.config[0], args.config[1:])
    report = run_pipeline(cfg)
    print(f"report: {report}")
    return 0

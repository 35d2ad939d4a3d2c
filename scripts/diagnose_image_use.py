#!/usr/bin/env python
"""Does a pipeline run's model read its images? Greedy accuracy on the evaluation splits with the real
images and with the same questions on blank (white) images of the same size, and the teacher-forced NLL
of the reference solutions with either (:mod:`specs_jax.pipeline.image_use`; the pipeline's eval stage
writes the same measurement to ``eval/image_use.json``).

    python scripts/diagnose_image_use.py runs/specs_tiny                      # base and final models
    python scripts/diagnose_image_use.py runs/specs_tiny --models base grpo_zero cold_start grpo_final
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="run directory of `specs-jax pipeline` (holds config.json, data/, base/)")
    p.add_argument("--models", nargs="+", default=["base", "grpo_final"],
                   help="stage directories under run_dir whose model/ to evaluate (default: base grpo_final)")
    args = p.parse_args(argv)

    from specs_jax.data.pair_sampling import Policies
    from specs_jax.pipeline.config import load_pipeline_config
    from specs_jax.pipeline.image_use import blind_base, image_use
    from specs_jax.pipeline.run import _eval_rows

    config = args.run_dir / "config.json"
    if not config.is_file():
        p.error(f"{config} not found: run_dir must be a `specs-jax pipeline` run directory")
    cfg = load_pipeline_config(config, [])
    missing = [m for m in args.models if not (args.run_dir / m / "model").is_dir()]
    if missing:
        p.error(f"no model directory for {missing} under {args.run_dir}")
    policies = Policies(args.run_dir / "base" / "model", cfg.eval["max_new_tokens"])
    max_length = cfg.base.get("train", {}).get("train", {}).get("max_length", 256)
    models = {m: args.run_dir / m / "model" for m in args.models}
    use = image_use(policies, models, _eval_rows(cfg, args.run_dir / "data"), cfg.system_prompt, max_length)
    print(f"{'model':12} {'split':9} {'acc real':>9} {'acc blank':>9} {'nll real':>9} {'nll blank':>9}")
    for model, by_split in use.items():
        for split, v in by_split.items():
            print(f"{model:12} {split:9} {v['real']:9.3f} {v['blank']:9.3f} {v['nll_real']:9.4f} {v['nll_blank']:9.4f}")
    print(blind_base(use) or "the base model reads its images" if "base" in use else "")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Does a pipeline run's model read its images? Greedy accuracy on the evaluation splits with the real
images and with the same questions on blank (white) images of the same size, and the teacher-forced NLL
of the reference solutions with either (:mod:`specs_jax.pipeline.image_use`; the pipeline's eval stage
writes the same measurement to ``eval/image_use.json``).

    python scripts/diagnose_image_use.py runs/specs_tiny                      # base and final models
    python scripts/diagnose_image_use.py runs/specs_tiny --models base grpo_zero cold_start grpo_final
    python scripts/diagnose_image_use.py runs/specs_tiny --fresh 512 --models base /tmp/other_base   # validation

``--fresh N`` measures on N newly drawn questions per split (data seed ``--data-seed``, the run's other synthetic
data settings) instead of the run's test splits: the draw to choose between models on (e.g. base models built
with different settings), so the test splits stay unseen by the choice.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="run directory of `specs-jax pipeline` (holds config.json, data/, base/)")
    p.add_argument("--models", nargs="+", default=["base", "grpo_final"],
                   help="stage directories under run_dir whose model/ to evaluate, or model directories "
                        "(default: base grpo_final)")
    p.add_argument("--fresh", type=int, default=0, metavar="N",
                   help="measure on N freshly drawn questions per split (a validation draw) instead of the run's "
                        "test splits")
    p.add_argument("--data-seed", type=int, default=1000, help="data seed of the --fresh draw (default: 1000)")
    args = p.parse_args(argv)

    from specs_jax.data.pair_sampling import Policies
    from specs_jax.pipeline.config import load_pipeline_config
    from specs_jax.pipeline.image_use import blind_base, image_use
    from specs_jax.pipeline.run import fresh_eval_rows, load_eval_rows

    config = args.run_dir / "config.json"
    if not config.is_file():
        p.error(f"{config} not found: run_dir must be a `specs-jax pipeline` run directory")
    cfg = load_pipeline_config(config, [])
    models = {m: args.run_dir / m / "model" if (args.run_dir / m / "model").is_dir() else Path(m) for m in args.models}
    missing = [m for m, d in models.items() if not (d / "config.json").is_file()]
    if missing:
        p.error(f"no model directory for {missing}: neither a stage under {args.run_dir} nor a model directory")
    if args.fresh < 0:
        p.error(f"--fresh {args.fresh}: give a number of questions per split (> 0)")
    try:
        rows = (fresh_eval_rows(cfg, args.fresh, args.data_seed) if args.fresh else
                load_eval_rows(cfg, args.run_dir / "data"))
    except ValueError as e:
        p.error(f"--data-seed: {e}")
    policies = Policies(args.run_dir / "base" / "model", cfg.eval["max_new_tokens"])
    max_length = cfg.base.get("train", {}).get("train", {}).get("max_length", 256)
    use = image_use(policies, models, rows, cfg.system_prompt, max_length)
    print(f"{'model':12} {'split':9} {'acc real':>9} {'acc blank':>9} {'nll real':>9} {'nll blank':>9}")
    for model, by_split in use.items():
        for split, v in by_split.items():
            print(f"{model:12} {split:9} {v['real']:9.3f} {v['blank']:9.3f} {v['nll_real']:9.4f} {v['nll_blank']:9.4f}")
    print(blind_base(use) or "the base model reads its images" if "base" in use else "")


if __name__ == "__main__":
    main()

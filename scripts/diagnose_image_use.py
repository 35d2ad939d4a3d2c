#!/usr/bin/env python
"""Does a pipeline run's model read its images? Greedy accuracy on the evaluation splits with the real
images and with the same questions on blank (white) images of the same size.

Equal accuracy means the answers come from the question text alone (the answer prior), so RL and
the cold start have no visual skill to sharpen. The script also prints how far the base model's
next-token distribution after the prompt moves when the real image is swapped for a blank one.

    python scripts/diagnose_image_use.py runs/specs_tiny                      # base and final models
    python scripts/diagnose_image_use.py runs/specs_tiny --models base grpo_zero cold_start grpo_final
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image


def blank_image(row: dict) -> dict:
    """The row with its image replaced by a white image of the same size (PNG bytes)."""
    size = Image.open(io.BytesIO(row["image"]["bytes"])).size
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 255, 255)).save(buf, "PNG")
    return {"image": {"bytes": buf.getvalue(), "path": None}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="run directory of `specs-jax pipeline` (holds config.json, data/, base/)")
    p.add_argument("--models", nargs="+", default=["base", "grpo_final"],
                   help="stage directories under run_dir whose model/ to evaluate (default: base grpo_final)")
    args = p.parse_args(argv)

    from specs_jax.data.pipeline import DataConfig, rl_batches
    from specs_jax.pipeline.config import load_pipeline_config
    from specs_jax.pipeline.run import Policies, _eval_config, _eval_rows

    config = args.run_dir / "config.json"
    if not config.is_file():
        p.error(f"{config} not found: run_dir must be a `specs-jax pipeline` run directory")
    cfg = load_pipeline_config(config, [])
    missing = [m for m in ["base", *args.models] if not (args.run_dir / m / "model").is_dir()]
    if missing:
        p.error(f"no model directory for {missing} under {args.run_dir}")
    rows = _eval_rows(cfg, args.run_dir / "data")
    blank = {split: r.map(blank_image) for split, r in rows.items()}
    policies = Policies(args.run_dir / "base" / "model", cfg.eval["max_new_tokens"])
    ecfg = _eval_config(cfg, num_samples=1, ks=[1])
    print("greedy accuracy with the real images / with blank images:")
    for name in args.models:
        acc = {label: policies.evaluate(args.run_dir / name / "model", data, ecfg, cfg.system_prompt, seed=0)["splits"]
               for label, data in (("real", rows), ("blank", blank))}
        print(f"  {name:12} " + ", ".join(f"{split} {acc['real'][split]['accuracy']:.3f} / "
                                          f"{acc['blank'][split]['accuracy']:.3f}" for split in rows))

    import jax

    model, split = policies.model, next(iter(rows))
    data = DataConfig(batch_size=16, buckets=(cfg.grpo_zero["train"]["max_length"],), shuffle=False, num_epochs=1,
                      system_prompt=cfg.system_prompt, read_threads=1)
    real, white = (next(iter(rl_batches(r, policies.processor, data))) for r in (rows[split], blank[split]))

    def next_token_probs(batch: dict) -> np.ndarray:
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
        return np.asarray(jax.nn.softmax(getattr(out, "logits", out)[:, -1], -1))

    tv = 0.5 * np.abs(next_token_probs(real) - next_token_probs(white)).sum(-1)
    print(f"base model, {split}: total-variation distance of the next-token distribution after the prompt, "
          f"real vs blank image: mean {tv.mean():.4f}, max {tv.max():.4f} over {len(tv)} prompts")


if __name__ == "__main__":
    main()

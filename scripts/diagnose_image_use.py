#!/usr/bin/env python
"""Does a pipeline run's model read its images? Greedy accuracy on the evaluation splits with the real
images and with the same questions on blank (white) images of the same size.

Equal accuracy means the answers come from the question text alone (the answer prior), so RL and
the cold start have no visual skill to sharpen. The script also prints the base model's
teacher-forced NLL of the reference solutions (which describe the image) with the real and with
the blank images: a model that reads its images finds the real description likelier.

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

    from specs_jax.data.pair_sampling import Policies
    from specs_jax.data.pipeline import DataConfig, sft_batches
    from specs_jax.pipeline.config import load_pipeline_config
    from specs_jax.pipeline.run import _eval_config, _eval_rows

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

    import jax.numpy as jnp

    from specs_jax.losses import token_logps
    from specs_jax.pipeline.base_model import plain_response

    split = next(iter(rows))
    data = DataConfig(batch_size=len(rows[split]), buckets=(cfg.base["train"]["train"]["max_length"],), shuffle=False,
                      num_epochs=1, drop_remainder=False, system_prompt=cfg.system_prompt, read_threads=1)

    def solution_nll(r) -> np.ndarray:
        """Per-row mean NLL of the reference solutions (the base model's plain-text SFT targets)."""
        r = r.add_column("response", [plain_response(x) for x in r["solution"]])
        batch = next(iter(sft_batches(r, policies.processor, data)))
        out = policies.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             batch["image_grid_thw"])
        logits = getattr(out, "logits", out)[:, :-1]
        logp = np.asarray(token_logps(logits, jnp.asarray(batch["input_ids"][:, 1:])))
        mask = (batch["loss_mask"] * batch["attention_mask"])[:, 1:]
        return -(logp * mask).sum(1) / mask.sum(1)

    real_nll, blank_nll = solution_nll(rows[split]), solution_nll(blank[split])
    print(f"base model, {split}: mean NLL per token of the reference solutions (teacher-forced) with the real "
          f"images {real_nll.mean():.4f}, with blank images {blank_nll.mean():.4f}; lower with the real image "
          f"on {(real_nll < blank_nll).mean():.0%} of {len(real_nll)} rows")

if __name__ == "__main__":
    main()

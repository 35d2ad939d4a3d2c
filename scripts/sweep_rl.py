#!/usr/bin/env python
"""Choose the RL settings of a pipeline config by the RL stability criterion alone: for every candidate (a set of
``grpo_zero.*`` overrides) and seed, GRPO-zero from the base model and the same GRPO continued from GRPO-zero's
model, each judged on its greedy ID format rate and accuracy against its start's (:mod:`specs_jax.pipeline.
rl_sweep`). Prints one line per run and the first candidate whose runs all pass on every seed; writes
``--out``/sweep.json. Resumable: finished runs are not redone.

    python scripts/sweep_rl.py --seeds 0 1 2 --out runs/rl_sweep \\
        --candidate grpo_zero.optim.lr=5e-4 --candidate grpo_zero.optim.lr=2e-4 \\
        --candidate "grpo_zero.optim.lr=2e-4 grpo_zero.train.steps=60" --config configs/specs_tiny.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                   help="pipeline YAML, then dotted overrides shared by every candidate")
    p.add_argument("--candidate", action="append", required=True, metavar="OVERRIDES",
                   help="one candidate: space-separated grpo_zero.* overrides (repeat; listed from the most "
                        "aggressive, the first that passes on every seed is chosen)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every candidate (default 0 1 2)")
    p.add_argument("--out", type=Path, default=Path("runs/rl_sweep"), help="sweep directory (default runs/rl_sweep)")
    args = p.parse_args(argv)

    from specs_jax.pipeline.rl_sweep import sweep_rl, sweep_table

    result = sweep_rl(args.config[0], args.config[1:], [c.split() for c in args.candidate], args.seeds, args.out)
    print("\n".join(sweep_table(result)))
    print(f"wrote {args.out / 'sweep.json'}")
    return 0 if result["chosen"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())

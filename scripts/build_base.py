#!/usr/bin/env python
"""Build the base model a pipeline config names in ``base.prebuilt`` and ship it there: the data and base stages
of the config (``base.rebuild``), then the model directory (HF weights, processor, ``build.json`` with what it was
built from and the files' sha256) moved to ``--out`` (default: ``models/<base.prebuilt>``). The pipeline's base
stage then copies it instead of training, as long as the config's data and base settings are unchanged.

    python scripts/build_base.py --config configs/specs_tiny.yaml
    python scripts/build_base.py --config configs/specs_tiny.yaml base.train.train.steps=3000 --out /tmp/base
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                   help="pipeline YAML, then dotted overrides (as `specs-jax pipeline --config`)")
    p.add_argument("--out", type=Path, default=None, help="model directory to write (default: the config's "
                   "base.prebuilt under models/); replaced only once the new model is complete")
    args = p.parse_args(argv)

    from specs_jax.pipeline import build_base, load_pipeline_config
    from specs_jax.pipeline.base_model import prebuilt_dir

    cfg = load_pipeline_config(args.config[0], args.config[1:])
    if args.out is None and not cfg.base.get("prebuilt"):
        p.error("the config sets no base.prebuilt: give --out")
    out = args.out or prebuilt_dir(cfg.base["prebuilt"])
    t0 = time.perf_counter()
    summary = build_base(cfg, out)
    print(json.dumps(summary))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

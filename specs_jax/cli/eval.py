"""``specs-jax eval --config CONFIG.yaml [key=value ...] [--model DIR [--step S]] [--out FILE.json]``: evaluate a model
on the prompt splits of ``eval.splits``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on the splits of eval.splits (accuracy, format rate, pass@k)",
                       description="Evaluate a model on each prompt split of the config's eval section "
                                   "(eval.splits: name -> parquet/jsonl/json/csv with question, image and answer "
                                   "columns; eval.max_examples: first N rows per split). Measured per split: "
                                   "greedy decoding -> accuracy (share of prompts whose last \\boxed{} answer "
                                   "equals the ground truth) and format rate (share with exactly "
                                   "<think>...</think><answer>...</answer>), mean response length; "
                                   "eval.num_samples samples at eval.temperature -> sample accuracy and format "
                                   "rate, and pass@k for k in eval.ks with the unbiased estimator "
                                   "1 - C(n-c, k)/C(n, k) averaged over prompts (n samples, c correct). "
                                   "Prints a table and writes JSON (metrics and example responses).")
    p.add_argument("--config", required=True, nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                   help="run YAML (e.g. configs/base.yaml), then config overrides with dotted keys, "
                        "e.g. eval.splits.id_test=data/id_test.parquet eval.max_examples=100")
    p.add_argument("--model", metavar="DIR", help="HF model directory, specs-jax Orbax checkpoint, or training "
                                                  "checkpoint RUN/checkpoints/STEP (or RUN with --step) "
                                                  "(default: model.path of the config)")
    p.add_argument("--step", default=None, metavar="latest|best|N",
                   help="with --model a run directory (train.output_dir): which checkpoint to evaluate")
    p.add_argument("--out", metavar="FILE.json",
                   help="where to write the results (default: <train.output_dir>/eval.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    p.set_defaults(run=run)


def format_table(splits: Mapping[str, Mapping[str, Any]], ks: Sequence[int]) -> str:
    """One row per split: prompts, greedy accuracy and format rate, sample accuracy, pass@k, mean length."""
    columns = ["prompts", "accuracy", "format", "sample_acc", *(f"pass@{k}" for k in ks), "length"]
    keys = ["n_prompts", "accuracy", "format_rate", "sample_accuracy", *(f"pass@{k}" for k in ks), "mean_length"]
    width = max(len("split"), *(len(name) for name in splits))
    lines = ["  ".join([f"{'split':<{width}}", *(f"{c:>10}" for c in columns)])]
    for name, metrics in splits.items():
        cells = [f"{metrics[k]:>10d}" if isinstance(metrics[k], int) else f"{metrics[k]:>10.3f}" for k in keys]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import jax

    from specs_jax.convert.io import load_model
    from specs_jax.data.pipeline import DataConfig as PipelineConfig
    from specs_jax.data.pipeline import load_rows
    from specs_jax.data.tokenizer import load_processor
    from specs_jax.evaluation import evaluate_model
    from specs_jax.training.config import load_config, to_dict
    from specs_jax.training.logging import write_json_atomic

    cfg = load_config(args.config[0], args.config[1:])
    from specs_jax.training.sharding import initialize_processes

    initialize_processes(cfg.mesh)  # several processes (mesh.*): each runs a share of the batches on its own copy
    if not cfg.eval.splits:
        raise ValueError("no evaluation splits: set eval.splits in the config or pass "
                         "eval.splits.NAME=FILE (e.g. eval.splits.id_test=data/id_test.parquet)")
    model_path = args.model or cfg.model.path
    if model_path is None:
        raise ValueError("no model to evaluate: pass --model DIR or set model.path")
    from specs_jax.convert.training import resolve_reference

    model_path = resolve_reference(model_path, args.step)  # a run's latest/best -> that step's directory
    splits = {}
    for name, path in cfg.eval.splits.items():
        try:
            splits[name] = load_rows(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"eval.splits.{name}: {e}") from None
    processor_path = cfg.data.processor or model_path
    processor = load_processor(processor_path)
    model = load_model(model_path, cfg.model.dtype, attention=cfg.model.attention)
    results = evaluate_model(model, processor, splits, cfg.eval, seed=cfg.train.seed,
                             progress=args.progress and jax.process_index() == 0,
                             pipeline=PipelineConfig(image_root=cfg.data.image_root, format=cfg.data.format))
    if jax.process_index() == 0:  # every process holds the gathered results; one reports them
        print(format_table(results["splits"], cfg.eval.ks))
        out = Path(args.out) if args.out else Path(cfg.train.output_dir) / "eval.json"
        write_json_atomic(out, {"model": str(model_path), "processor": str(processor_path), "seed": cfg.train.seed,
                                "eval": to_dict(cfg.eval), **results})
        print(f"wrote {out}")
    return 0

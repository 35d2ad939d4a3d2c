"""``specs-jax data synth --out DIR ...`` (synthetic dataset), ``specs-jax data pairs ...`` (SPECS stage 1) and
``specs-jax data inspect FILE`` (what the model will see from a data file)."""

from __future__ import annotations

import argparse
import json

HELP = "Prepare datasets for specs-jax."

SYNTH_HELP = """Generate the synthetic visual-reasoning dataset of specs_jax.data.synth: rendered images
(white background, SIZE px square) of coloured shapes, digits or bar charts, each with a question
whose answer is checkable (an integer, yes/no or a colour) and a worked solution ending in
\\boxed{answer}. Writes train.parquet, id_test.parquet, ood_test.parquet (columns id, question,
image, answer, solution, template, split, metadata) and summary.json into DIR; the same options
give byte-identical files.

Splits: train and id_test are in distribution (ID); ood_test is out of distribution (OOD) by
three rules:
  1. held-out (colour, kind) combinations, never drawn in ID and present in every OOD shapes or
     chart image: red circle, green square, blue triangle, purple square, purple bar;
  2. more objects than any ID image: ID 3-8 shapes, 2-4 digits, 3-4 bars; OOD 9-14 shapes,
     5-6 digits, 5-6 bars;
  3. templates used only in OOD: subtract_shape ("Subtract all circles. How many shapes are
     left?") and chart_min ("Which bar is the shortest?"), besides the ID templates
     count_colour_shape, subtract_colour, compare_shapes, digit_sum and chart_max."""


PAIRS_HELP = """SPECS stage 1 (METHOD.md section 2): sample K responses per training prompt from the GRPO-zero
policy and from the base policy; chosen = a GRPO-zero response with the correct answer AND the
<think>/<answer> format; rejected = the same correct answer with a corrupted format (one of the five
corruptions, uniformly) or, with --base-rejected-prob, a correct unformatted base response. Writes
pairs.parquet (prompt, image, chosen, rejected, corruption_kind, source_policy, answer), the prompt
images under images/, and pairs_summary.json; train the cold start on it with
`specs-jax train dpo --config configs/dpo_7b.yaml data.source=files data.train_path=OUT/pairs.parquet
data.image_root=OUT data.columns={question: prompt}`. With --sharegpt it also writes the pairs in
LLaMA-Factory's ShareGPT preference format (OUT/pairs_sharegpt.json, registered in OUT/dataset_info.json
as specs_pairs) to cross-check the cold start with LLaMA-Factory; specs-jax trains on that file too
(data.train_path=OUT/pairs_sharegpt.json data.image_root=OUT)."""

INSPECT_HELP = """Show what the model will see from a data file before any training: the detected format
(flat, mm_eureka, easyr1, verl, trl, sharegpt), the column of each role, the modes the columns allow
(rl: prompts with answers, sft, preference), row and image counts, the bad rows by reason (with the first
of each) and the first usable prompt rendered with the chat template, its image blocks in place. Every row
goes through the batch pipeline's steps (images are opened; with --processor, prompts are tokenised and
rows longer than --max-length are counted as too_long)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare datasets", description=HELP)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = actions.add_parser("synth", help="generate the synthetic ID/OOD visual-reasoning dataset",
                           description=SYNTH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (created; same-named files replaced)")
    s.add_argument("--n-train", type=int, default=1000, metavar="N", help="train rows (default 1000)")
    s.add_argument("--n-id-test", type=int, default=200, metavar="N", help="id_test rows (default 200)")
    s.add_argument("--n-ood-test", type=int, default=200, metavar="N", help="ood_test rows (default 200)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    s.add_argument("--size", type=int, default=84, metavar="PX", help="image side in pixels, a multiple of 28 in [56, 112] (default 84)")
    s.set_defaults(run=run_synth)
    pr = actions.add_parser("pairs", help="SPECS stage 1: self-distilled format-preference pairs",
                            description=PAIRS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--grpo-zero", required=True, metavar="DIR", help="GRPO-zero model (HF or Orbax, with processor)")
    pr.add_argument("--base", required=True, metavar="DIR", help="base model of the same architecture")
    pr.add_argument("--data", required=True, metavar="FILE", help="training prompts: parquet/jsonl with question, "
                                                                 "image and answer columns")
    pr.add_argument("--out", required=True, metavar="DIR", help="output directory (pairs.parquet, images/, "
                                                                "pairs_summary.json)")
    pr.add_argument("--prompts", type=int, default=0, metavar="N", help="first N prompts (default 0: all)")
    pr.add_argument("--samples", type=int, default=8, metavar="K", help="responses per prompt and policy (default 8)")
    pr.add_argument("--temperature", type=float, default=1.0)
    pr.add_argument("--max-new-tokens", type=int, default=1024)
    pr.add_argument("--pairs-per-prompt", type=int, default=2)
    pr.add_argument("--base-rejected-prob", type=float, default=0.5,
                    help="chance that a rejected response is a correct unformatted base response (default 0.5)")
    pr.add_argument("--system-prompt", default=None, help="system message of the prompts (the RL stages' one)")
    pr.add_argument("--image-root", default=None, metavar="DIR", help="directory of relative image paths")
    pr.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--format", default="auto", help="layout of --data (default: auto, from the columns)")
    pr.add_argument("--sharegpt", action="store_true", help="also write pairs_sharegpt.json + dataset_info.json "
                                                            "(LLaMA-Factory ShareGPT preference format)")
    pr.set_defaults(run=run_pairs)
    ins = actions.add_parser("inspect", help="show the detected format, counts, bad rows and a rendered prompt",
                             description=INSPECT_HELP)
    ins.add_argument("file", metavar="FILE", help="data file: parquet, jsonl, json or csv")
    ins.add_argument("--processor", metavar="DIR", default=None,
                     help="model/processor directory: render with its chat template and count tokens")
    ins.add_argument("--format", default="auto", help="auto (default) or flat, mm_eureka, easyr1, verl, trl, sharegpt")
    ins.add_argument("--mode", choices=["rl", "sft", "preference"], default=None,
                     help="read the rows as this mode (default: preference, rl or sft, the first the columns allow)")
    ins.add_argument("--image-root", metavar="DIR", default=None, help="directory of relative image paths")
    ins.add_argument("--system-prompt", default=None, help="data.system_prompt (a system message in the data wins)")
    ins.add_argument("--override-data-system", action="store_true",
                     help="data.override_data_system: --system-prompt replaces the data's system messages")
    ins.add_argument("--column", action="append", default=[], metavar="ROLE=NAME",
                     help="data.columns entry, e.g. --column question=prompt (repeat for several)")
    ins.add_argument("--max-length", type=int, default=4096, help="largest bucket, with --processor (default 4096)")
    ins.add_argument("--limit", type=int, default=0, metavar="N", help="inspect the first N rows (default 0: all)")
    ins.add_argument("--row", type=int, default=None, metavar="I", help="render row I (default: the first usable)")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.set_defaults(run=run_inspect)


def run_synth(args: argparse.Namespace) -> int:
    from specs_jax.data.synth import SynthConfig, save_synth, summarize, synth_dataset

    config = SynthConfig(n_train=args.n_train, n_id_test=args.n_id_test, n_ood_test=args.n_ood_test,
                         seed=args.seed, size=args.size)
    dataset = synth_dataset(config)
    out = save_synth(dataset, args.out)
    print(json.dumps(summarize(dataset)["splits"], indent=2))
    print(f"wrote {out}")
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specs_jax.data.pair_sampling import PairsConfig, Policies, sample_pairs
    from specs_jax.data.pipeline import load_rows

    cfg = PairsConfig(prompts=args.prompts, samples=args.samples, temperature=args.temperature,
                      pairs_per_prompt=args.pairs_per_prompt, base_rejected_prob=args.base_rejected_prob)
    policies = Policies(Path(args.base), args.max_new_tokens, args.dtype)
    summary = sample_pairs(policies, Path(args.grpo_zero), Path(args.base), _prompt_rows(load_rows(args.data), args),
                           Path(args.out), cfg, args.system_prompt, args.seed, args.image_root)
    print(f"wrote {summary['pairs']} pairs from {summary['prompts']} prompts to {args.out}")
    if getattr(args, "sharegpt", False):
        import datasets

        from specs_jax.data.pairs import save_sharegpt

        pairs = datasets.Dataset.from_parquet(str(Path(args.out) / "pairs.parquet"))
        print(f"wrote {save_sharegpt(pairs, args.out, args.system_prompt)} (LLaMA-Factory ShareGPT, dataset "
              f"'specs_pairs' in {Path(args.out) / 'dataset_info.json'})")
    return 0


def _prompt_rows(rows, args: argparse.Namespace):
    """The training prompts in flat form (question, image, answer), whatever the format of --data."""
    fmt = getattr(args, "format", "auto")
    if fmt in ("auto", "flat") and {"question", "image", "answer"} <= set(rows.column_names):
        return rows
    from specs_jax.data.formats import flat_rows

    flat, dropped = flat_rows(rows, fmt)
    if dropped:
        print(f"--data: {sum(dropped.values())} rows left out {dropped}")
    return flat


def run_inspect(args: argparse.Namespace) -> int:
    from specs_jax.data.inspect import format_report, inspect_rows
    from specs_jax.data.pipeline import Columns, DataConfig

    columns = {}
    for item in args.column:
        role, sep, name = item.partition("=")
        if not sep or not role:
            raise ValueError(f"--column {item!r} is not ROLE=NAME")
        columns[role] = None if name in ("", "null", "none") else name
    try:
        cols = Columns(**columns)
    except TypeError:
        raise ValueError(f"--column: unknown role in {sorted(columns)}; roles: {list(Columns.__dataclass_fields__)}")
    config = DataConfig(columns=cols, format=args.format, image_root=args.image_root, system_prompt=args.system_prompt,
                        override_data_system=args.override_data_system, buckets=(args.max_length,))
    processor = None
    if args.processor is not None:
        from specs_jax.data.tokenizer import load_processor

        processor = load_processor(args.processor)
    report = inspect_rows(args.file, config, args.mode, processor, args.limit, args.row)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report, args.processor))
    return 0

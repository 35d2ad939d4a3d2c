"""``specs-jax data synth --out DIR ...`` (synthetic dataset) and ``specs-jax data pairs ...`` (SPECS stage 1)."""

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
data.image_root=OUT data.columns={question: prompt}`."""


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
    pr.set_defaults(run=run_pairs)


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
    summary = sample_pairs(policies, Path(args.grpo_zero), Path(args.base), load_rows(args.data), Path(args.out), cfg,
                           args.system_prompt, args.seed, args.image_root)
    print(f"wrote {summary['pairs']} pairs from {summary['prompts']} prompts to {args.out}")
    return 0

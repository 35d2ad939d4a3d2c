"""``specs-jax data synth --out DIR [--n-train N] [--n-id-test N] [--n-ood-test N] [--seed S] [--size PX]``."""

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


def run_synth(args: argparse.Namespace) -> int:
    from specs_jax.data.synth import SynthConfig, save_synth, summarize, synth_dataset

    config = SynthConfig(n_train=args.n_train, n_id_test=args.n_id_test, n_ood_test=args.n_ood_test,
                         seed=args.seed, size=args.size)
    dataset = synth_dataset(config)
    out = save_synth(dataset, args.out)
    print(json.dumps(summarize(dataset)["splits"], indent=2))
    print(f"wrote {out}")
    return 0

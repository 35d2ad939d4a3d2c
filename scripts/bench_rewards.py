"""Benchmark the SPECS reward: rewards scored per second on synthetic rollouts.

Generates realistic responses (200-1000 words of reasoning with inline LaTeX; formatted or
not; correct or not; integer, decimal, fraction, percentage, degree, unit and
multiple-choice answers; 8 rollouts per prompt sharing a ground truth) and times
``specs_jax.rewards.score_batch`` in a single process.
"""

from __future__ import annotations

import argparse
import random
import time

from specs_jax.rewards import score_batch

WORDS = (
    "the triangle angle side so therefore we have since area ratio similar equal length "
    "point line circle radius because then compute total each value first next note that "
    "figure shows given find answer sum product half twice of is and to a in"
).split()
LATEX = ("$\\angle AED = \\angle B$", "$\\frac{AE}{AB} = \\frac{DE}{BC}$", "$x^2 + 3x - 4 = 0$",
         "$\\sqrt{16} = 4$", "$3 \\times 4 = 12$", "$\\pi r^2$")


def make_answer(rng: random.Random) -> tuple[str, str, str]:
    """(ground truth, a correct written form, a wrong written form)."""
    kind = rng.randrange(7)
    n, d = rng.randint(1, 9999), rng.randint(2, 99)
    if kind == 0:
        return str(n), str(n), str(n + 1)
    if kind == 1:
        return f"{n / 8:g}", f"{n / 8:g}", f"{n / 8 + 0.5:g}"
    if kind == 2:
        return f"{n}/{d}", f"\\frac{{{2 * n}}}{{{2 * d}}}", f"\\dfrac{{{n + 1}}}{{{d}}}"
    if kind == 3:
        return f"{n % 100}%", f"{n % 100}\\%", f"{n % 100 + 1}\\%"
    if kind == 4:
        return str(n % 360), f"{n % 360}^\\circ", f"{n % 360 + 5}^{{\\circ}}"
    if kind == 5:
        return str(n), f"{n} \\text{{ cm}}", f"-{n}\\text{{ cm}}"
    letter = rng.choice("ABCD")
    return letter, f"({letter})", "E."


def make_response(rng: random.Random, written: str) -> str:
    n_words = rng.randint(200, 1000)
    reasoning = " ".join(rng.choice(WORDS) if rng.random() > 0.05 else rng.choice(LATEX) for _ in range(n_words))
    style = rng.random()
    if style < 0.6:
        return f"<think>{reasoning}</think>\n<answer>The answer is \\boxed{{{written}}}.</answer>"
    if style < 0.8:
        return f"{reasoning}\nThus the answer is \\boxed{{{written}}}."
    if style < 0.9:
        return f"<think>{reasoning}</think> extra <answer>\\boxed{{{written}}}</answer>"
    return f"{reasoning}\nSo the answer is {written}."


def make_batch(n: int, seed: int, group: int = 8) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, truths = [], []
    while len(texts) < n:
        truth, right, wrong = make_answer(rng)
        for _ in range(group):
            texts.append(make_response(rng, right if rng.random() < 0.5 else wrong))
            truths.append(truth)
    return texts[:n], truths[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of responses (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic responses")
    args = parser.parse_args()
    texts, truths = make_batch(args.n, args.seed)
    start = time.perf_counter()
    batch = score_batch(texts, truths)
    elapsed = time.perf_counter() - start
    chars = sum(map(len, texts)) / len(texts)
    print(f"{len(texts)} responses (mean {chars:.0f} chars) scored in {elapsed:.3f} s")
    print(f"format rate {batch.format.mean() / 0.5:.3f}, accuracy {batch.accuracy.mean():.3f}")
    print(f"{len(texts) / elapsed:,.0f} rewards/s")


if __name__ == "__main__":
    main()

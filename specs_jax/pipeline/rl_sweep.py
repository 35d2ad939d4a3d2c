"""Choose the tiny runs' RL settings by the RL stability criterion alone (:func:`~specs_jax.pipeline.findings.
rl_collapse`: greedy ID format rate >= 0.9 and ID accuracy at most 0.05 below the model the run started from),
never by a comparison between cold starts. The pipeline runs RL from two kinds of start: the base model (GRPO-zero,
which must learn the format) and a model that already follows it (the final GRPO, from a cold start). A candidate
is judged from both, without using a cold start: for every seed, GRPO-zero from the base model, then the same
GRPO continued from GRPO-zero's model (``grpo_continued``); each run is evaluated greedily on ID and judged
against its own start.

A candidate is a list of dotted overrides of ``grpo_zero.*`` keys (e.g. ``grpo_zero.optim.lr=2e-4``); the chosen
one is the first candidate, in the order given, whose runs all pass on every seed (list them from the most
aggressive: the largest learning rate that stays stable learns the most in the runs' few steps). The final GRPO is
meant to use the same settings (the config writes them in both sections). Results go to ``out/sweep.json``; every
run is a resumable pipeline stage under ``out/<candidate>/seed<s>``, the data and base model are made once in
``out/shared`` (the base model is the config's ``base.prebuilt`` when it matches, as in the pipeline).

    python scripts/sweep_rl.py --config configs/specs_tiny.yaml --seeds 0 1 2 \\
        --candidate grpo_zero.optim.lr=5e-4 --candidate grpo_zero.optim.lr=2e-4
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from specs_jax.pipeline.config import ConfigError, load_pipeline_config
from specs_jax.pipeline.findings import RL_CRITERION, eval_metric, rl_collapse
from specs_jax.training.logging import write_json_atomic

__all__ = ["sweep_rl"]

SPLIT = "id_test"
RUNS = (("grpo_zero", "base"), ("grpo_continued", "grpo_zero"))  # (RL run, the model it starts from)


def _candidate_dir(candidate: Sequence[str]) -> str:
    """A directory name for a candidate's overrides (``grpo_zero.optim.lr=2e-4`` -> ``optim.lr=2e-4``)."""
    name = "+".join(o.removeprefix("grpo_zero.") for o in candidate) or "config"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def _greedy_eval(policies, model: Path, rows: dict, cfg, out: Path) -> dict:
    """Greedy evaluation of ``model`` on ``rows`` (``out``: its JSON, reused when present)."""
    from specs_jax.pipeline.run import _eval_config

    if not out.is_file():
        write_json_atomic(out, policies.evaluate(model, rows, _eval_config(cfg, num_samples=1, ks=[1]),
                                                 cfg.system_prompt, seed=0))
    return json.loads(out.read_text())


def sweep_rl(config: str | Path, overrides: Sequence[str], candidates: Sequence[Sequence[str]],
             seeds: Sequence[int], out: Path) -> dict:
    """Run GRPO-zero of the pipeline config ``config`` (+ ``overrides``) and its continuation for every candidate
    (a list of ``grpo_zero.*`` overrides) and seed, judge each run by the RL stability criterion against its start
    and return (and write to ``out/sweep.json``) ``{"criterion", "base": {accuracy, format_rate}, "candidates":
    [{"overrides", "runs": {seed: {run: {accuracy, format_rate, fails}}}, "passes"}], "chosen": overrides or
    None}`` (``run``: ``grpo_zero``, ``grpo_continued``)."""
    from specs_jax.pipeline.run import _rl_stage, _stage, _timings, load_eval_rows, prepare_shared
    from specs_jax.data.pair_sampling import Policies

    if not candidates or not seeds:
        raise ConfigError("sweep_rl: give at least one candidate and one seed")
    for cand in candidates:
        for item in cand:
            if not item.startswith("grpo_zero."):
                raise ConfigError(f"candidate override {item!r}: a candidate may only change grpo_zero.* keys "
                                  "(the data, base model and evaluation are shared by every candidate)")
    out = Path(out)
    cfg = load_pipeline_config(config, list(overrides))
    data, base = prepare_shared(cfg, out / "shared")
    rows = {SPLIT: load_eval_rows(cfg, data)[SPLIT]}
    policies = Policies(base, cfg.eval.get("max_new_tokens", 256))
    base_eval = _greedy_eval(policies, base, rows, cfg, out / "shared" / "base_eval.json")
    result = {"criterion": f"{RL_CRITERION}: GRPO-zero from the base model and GRPO continued from GRPO-zero's "
                           "model, on every seed",
              "base": {k: eval_metric(base_eval, SPLIT, k) for k in ("accuracy", "format_rate")},
              "candidates": [], "chosen": None}
    for cand in candidates:
        ccfg = load_pipeline_config(config, [*overrides, *cand])
        runs = {}
        for seed in seeds:
            root = out / _candidate_dir(cand) / f"seed{seed}"
            root.mkdir(parents=True, exist_ok=True)
            evals, runs[str(seed)] = {"base": base_eval}, {}
            for run, start in RUNS:
                start_model = base if start == "base" else root / start / "model"
                _stage(root, run, _rl_stage(ccfg, "grpo_zero", seed, data, start_model), _timings(root))
                evals[run] = _greedy_eval(policies, root / run / "model", rows, ccfg, root / f"eval_{run}.json")
                runs[str(seed)][run] = {"accuracy": eval_metric(evals[run], SPLIT, "accuracy"),
                                        "format_rate": eval_metric(evals[run], SPLIT, "format_rate"),
                                        "fails": rl_collapse(evals, run, start, SPLIT)}
                print(f"[sweep] {_run_line(cand, seed, run, runs[str(seed)][run])}", flush=True)
        passes = all(r["fails"] is None for by_run in runs.values() for r in by_run.values())
        result["candidates"].append({"overrides": list(cand), "runs": runs, "passes": passes})
        if passes and result["chosen"] is None:
            result["chosen"] = list(cand)
        write_json_atomic(out / "sweep.json", result)
    return result


def _run_line(candidate: Sequence[str], seed, run: str, r: dict) -> str:
    """One RL run of the sweep and its verdict, as printed and as :func:`sweep_table` lists it."""
    return (f"{' '.join(candidate) or '(config)'}  seed {seed} {run}: {SPLIT} accuracy {r['accuracy']:.3f}, "
            f"format rate {r['format_rate']:.3f}: " + (f"fails ({r['fails']})" if r["fails"] else "passes"))


def sweep_table(result: dict) -> list[str]:
    """The sweep as printed lines: the base model, one line per candidate and seed, the choice."""
    base = result["base"]
    lines = [f"criterion: {result['criterion']}",
             f"base model: {SPLIT} accuracy {base['accuracy']:.3f}, format rate {base['format_rate']:.3f}"]
    for c in result["candidates"]:
        for seed, by_run in c["runs"].items():
            lines += [_run_line(c["overrides"], seed, run, r) for run, r in by_run.items()]
    chosen = result["chosen"]
    lines.append("chosen: " + (" ".join(chosen) or "(config)" if chosen is not None else
                               "none: no candidate passes on every seed"))
    return lines

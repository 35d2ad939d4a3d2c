"""Choose the tiny runs' RL settings by the RL stability criterion alone (:func:`~specs_jax.pipeline.findings.
rl_collapse`: greedy ID format rate >= 0.9 and ID accuracy at most 0.05 below the base model's), never by a
comparison between cold starts: GRPO-zero from the base model, for every candidate setting and seed, then the
greedy ID evaluation of each run against the base model's.

A candidate is a list of dotted overrides of ``grpo_zero.*`` keys (e.g. ``grpo_zero.optim.lr=2e-4``); the chosen
one is the first candidate, in the order given, that passes on every seed (list them from the most aggressive:
the largest learning rate that stays stable learns the most in the runs' few steps). The final GRPO is meant to
use the same settings (the config writes them in both sections). Results go to ``out/sweep.json``; every run is
a resumable pipeline stage under ``out/<candidate>/seed<s>``, the data and base model are made once in
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
    """Run GRPO-zero of the pipeline config ``config`` (+ ``overrides``) for every candidate (a list of
    ``grpo_zero.*`` overrides) and seed, judge each run by the RL stability criterion and return (and write to
    ``out/sweep.json``) ``{"criterion", "base": {accuracy, format_rate}, "candidates": [{"overrides", "runs":
    {seed: {accuracy, format_rate, fails}}, "passes"}], "chosen": overrides or None}``."""
    from specs_jax.pipeline.run import _eval_rows, _rl_stage, _stage, _timings, prepare_shared
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
    rows = {SPLIT: _eval_rows(cfg, data)[SPLIT]}
    policies = Policies(base, cfg.eval.get("max_new_tokens", 256))
    base_eval = _greedy_eval(policies, base, rows, cfg, out / "shared" / "base_eval.json")
    result = {"criterion": f"{RL_CRITERION} (the base model), on every seed",
              "base": {k: eval_metric(base_eval, SPLIT, k) for k in ("accuracy", "format_rate")},
              "candidates": [], "chosen": None}
    for cand in candidates:
        ccfg = load_pipeline_config(config, [*overrides, *cand])
        runs = {}
        for seed in seeds:
            root = out / _candidate_dir(cand) / f"seed{seed}"
            root.mkdir(parents=True, exist_ok=True)
            _stage(root, "grpo_zero", _rl_stage(ccfg, "grpo_zero", seed, data, base), _timings(root))
            ev = _greedy_eval(policies, root / "grpo_zero" / "model", rows, ccfg, root / "eval.json")
            runs[str(seed)] = {"accuracy": eval_metric(ev, SPLIT, "accuracy"),
                               "format_rate": eval_metric(ev, SPLIT, "format_rate"),
                               "fails": rl_collapse({"base": base_eval, "grpo_zero": ev}, "grpo_zero", "base", SPLIT)}
            print(f"[sweep] {' '.join(cand) or '(config)'} seed {seed}: {_verdict(runs[str(seed)])}", flush=True)
        passes = all(r["fails"] is None for r in runs.values())
        result["candidates"].append({"overrides": list(cand), "runs": runs, "passes": passes})
        if passes and result["chosen"] is None:
            result["chosen"] = list(cand)
        write_json_atomic(out / "sweep.json", result)
    return result


def _verdict(run: dict) -> str:
    return (f"{SPLIT} accuracy {run['accuracy']:.3f}, format rate {run['format_rate']:.3f}: "
            + (f"fails ({run['fails']})" if run["fails"] else "passes"))


def sweep_table(result: dict) -> list[str]:
    """The sweep as printed lines: the base model, one line per candidate and seed, the choice."""
    base = result["base"]
    lines = [f"criterion: {result['criterion']}",
             f"base model: {SPLIT} accuracy {base['accuracy']:.3f}, format rate {base['format_rate']:.3f}"]
    for c in result["candidates"]:
        name = " ".join(c["overrides"]) or "(config)"
        for seed, run in c["runs"].items():
            lines.append(f"{name}  seed {seed}: {_verdict(run)}")
    chosen = result["chosen"]
    lines.append("chosen: " + (" ".join(chosen) or "(config)" if chosen is not None else
                               "none: no candidate passes on every seed"))
    return lines

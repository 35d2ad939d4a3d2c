"""The SPECS pipeline, stage by stage, resumable: a finished stage (its ``DONE.json``) is not redone,
an interrupted training stage resumes from its last checkpoint.

Stages of one seed, in ``R = run_dir`` (ablation: ``run_dir/seed<s>``, with the data and the base model
made once in ``run_dir/shared`` and shared by every seed, as the paper's runs share their base model)::

    data        synthetic dataset: data/{train,id_test,ood_test}.parquet
    base        processor + tiny base model (SFT, mostly plain-text answers): base/model
    grpo_zero   GRPO from the base model: grpo_zero/model
    pairs       samples of GRPO-zero and base on training prompts -> pairs/pairs.parquet
    cold_start  DPO-hybrid (or SFT on the chosen responses) from the base model, checkpoints
                evaluated for the GF curve: cold_start/model, cold_start/gf.json
    grpo_final  GRPO from the cold-start model (from the base model without a cold start)
    eval        greedy accuracy / format rate / pass@k of every model on both splits; RBF
    report      report.md + plots/ (specs_jax.pipeline.report)

Every stage directory holds the stage's ``train/metrics.jsonl`` (and TensorBoard), checkpoints and
the exported HF model (with the processor), so any stage's model loads with ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from specs_jax.data.pair_sampling import Policies, sample_pairs
from specs_jax.pipeline.config import PipelineConfig, stage_config
from specs_jax.pipeline.image_use import image_use
from specs_jax.training.logging import write_json_atomic

__all__ = ["build_base", "fresh_eval_rows", "load_eval_rows", "run_pipeline"]

EVAL_SPLITS = ("id_test", "ood_test")


def _stage(root: Path, name: str, fn: Callable[[Path], dict], timings: dict) -> dict:
    """Run ``fn(stage_dir)`` unless ``stage_dir/DONE.json`` exists; record its summary and time."""
    out = root / name
    done = out / "DONE.json"
    if done.is_file():
        print(f"[{root.name}] {name}: done earlier, skipped")
        return json.loads(done.read_text())
    print(f"[{root.name}] {name}: running")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary = fn(out)
    timings[name] = time.perf_counter() - t0
    write_json_atomic(root / "timings.json", timings)
    write_json_atomic(done, summary)
    return summary


# ---------------------------------------------------------------------------------- training


def _save_model(trainer, processor, out: Path) -> Path:
    """Export the trainer's current parameters (+ processor) as an HF model directory."""
    from specs_jax.convert.io import save_model
    from specs_jax.training.state import join_params, model_from_params

    model = model_from_params(trainer.graphdef, join_params(trainer.state.params, trainer.state.frozen))
    save_model(model, out, fmt="hf", overwrite=True)
    processor.save_pretrained(out)
    return out


def _train(kind: str, rcfg, processor, data_path: Path, out: Path, system_prompt: str, model=None,
           columns=None, image_root: str | None = None) -> dict:
    """Train one stage to ``rcfg.train.steps`` (resuming its checkpoints) on the rows of ``data_path``,
    export ``out/model``."""
    from specs_jax.training.assemble import assemble_run

    processor_dir = rcfg.data.processor
    if rcfg.model.path is None and processor_dir is None:  # a model built in memory: its processor goes to disk
        processor_dir = str(out / "processor")
        processor.save_pretrained(processor_dir)
    data = dataclasses.replace(rcfg.data, source="files", train_path=str(data_path), image_root=image_root,
                               system_prompt=system_prompt, processor=processor_dir,
                               columns=dataclasses.asdict(columns) if columns is not None else {})
    run = assemble_run(dataclasses.replace(rcfg, data=data), kind, processor, model)
    history = run.trainer.fit(run.data, resume=True)
    run.trainer.close()
    _save_model(run.trainer, processor, out / "model")
    last = history[-1] if history else {}
    return {"steps": run.trainer.loop_step, "last": last, "skipped_rows": dict(getattr(run.data, "skipped", {}) or {})}


def _stage_run_config(cfg: PipelineConfig, stage: str, out: Path, seed: int, model_path: str | None,
                      variant: dict | None = None, **extra):
    return stage_config(cfg, stage, variant, model__path=model_path, train__output_dir=str(out / "train"),
                        train__seed=seed, data__system_prompt=cfg.system_prompt, **extra)


# ---------------------------------------------------------------------------------- stages


def _data_stage(cfg: PipelineConfig, seed: int) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        from specs_jax.data.synth import SynthConfig, save_synth, summarize, synth_dataset

        ds = synth_dataset(SynthConfig(**{**cfg.synth, "seed": seed}))
        save_synth(ds, out)
        return summarize(ds)
    return run


def _base_stage(cfg: PipelineConfig, seed: int, data: Path) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        import jax
        from flax import nnx

        from specs_jax.data.pipeline import load_rows
        from specs_jax.data.tokenizer import ProcessorConfig, build_processor, model_token_fields
        from specs_jax.model import Qwen2_5_VLForConditionalGeneration, from_hf_dict, load_preset
        from specs_jax.pipeline.base_model import (
            BUILD_FILE,
            BaseModelConfig,
            build_key,
            file_sha256,
            formatted_response,
            prebuilt_dir,
            prebuilt_mismatch,
            rows_digest,
            sft_rows,
        )

        base = BaseModelConfig(**cfg.base)
        rows = load_rows(data / "train.parquet")
        key = build_key(cfg.base, cfg.system_prompt, cfg.common, rows_digest(rows), seed)
        if base.prebuilt and not base.rebuild:
            source = prebuilt_dir(base.prebuilt)
            why = prebuilt_mismatch(source, key)
            if why is None:
                shutil.copytree(source, out / "model", dirs_exist_ok=True)
                print(f"[{out.parent.name}] base: the prebuilt base model {source} (base.rebuild=true trains it)")
                return {**json.loads((source / BUILD_FILE).read_text())["summary"], "prebuilt": str(source)}
            print(f"[{out.parent.name}] base: not using the prebuilt base model: {why}; training it")
        targets, formatted = sft_rows(rows["solution"], base.format_fraction, seed)
        # the system prompt and the chat roles open every prompt: repeated so the BPE learns them as few tokens
        corpus = [*rows["question"], *rows["solution"], *map(formatted_response, rows["solution"][:64]),
                  *[f"system\n{cfg.system_prompt}\nuser\nassistant\n"] * 64]
        processor = build_processor(corpus, ProcessorConfig(vocab_size=base.vocab_size))
        hf = load_preset("tiny").hf_config
        arch = dict(base.architecture)
        vision = {**hf["vision_config"], **arch.pop("vision_config", {})}
        rcfg = _stage_run_config(cfg, "base", out, seed, None)
        model_cfg = from_hf_dict({**hf, **arch, "vision_config": vision, **model_token_fields(processor.tokenizer)},
                                 **rcfg.model.options())
        sft_path = out / "sft.parquet"
        rows.add_column("response", targets).to_parquet(str(sft_path))
        model = Qwen2_5_VLForConditionalGeneration(model_cfg, rngs=nnx.Rngs(seed))
        summary = _train("sft", rcfg, processor, sft_path, out, cfg.system_prompt, model=model)
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        summary = {**summary, "parameters": int(n), "vocab_size": model_cfg.text.vocab_size,
                   "sft_rows": len(targets), "sft_formatted_share": float(formatted.mean())}
        files = sorted(f.name for f in (out / "model").iterdir() if f.is_file() and f.name != BUILD_FILE)
        write_json_atomic(out / "model" / BUILD_FILE, {
            "key": key, "summary": summary, "sha256": {f: file_sha256(out / "model" / f) for f in files}})
        return summary
    return run


def _rl_stage(cfg: PipelineConfig, stage: str, seed: int, data: Path, start: Path) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        from specs_jax.data.tokenizer import load_processor

        rcfg = _stage_run_config(cfg, stage, out, seed, str(start))
        return _train("grpo", rcfg, load_processor(start), data / "train.parquet", out, cfg.system_prompt)
    return run


def _pairs_stage(cfg: PipelineConfig, seed: int, data: Path, base: Path, grpo_zero: Path,
                 policies: Policies) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        from specs_jax.data.pipeline import load_rows

        return sample_pairs(policies, grpo_zero, base, load_rows(data / "train.parquet"), out, cfg.pairs,
                            cfg.system_prompt, seed)
    return run


def _cold_start_stage(cfg: PipelineConfig, seed: int, variant: dict, pairs: Path, base: Path,
                      eval_rows: dict, policies: Policies) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        from specs_jax.data.pipeline import PAIR_COLUMNS, Columns
        from specs_jax.data.tokenizer import load_processor

        kind = variant.get("kind", "dpo")
        rcfg0 = _stage_run_config(cfg, "cold_start", out, seed, str(base), variant)
        every = max(rcfg0.train.steps // cfg.gf_points, 1)
        rcfg = _stage_run_config(cfg, "cold_start", out, seed, str(base), variant, checkpoint__every=every,
                                 checkpoint__keep_last_n=cfg.gf_points + 2)
        columns = PAIR_COLUMNS if kind == "dpo" else Columns(question="prompt", response="chosen")
        processor = load_processor(base)
        summary = _train(kind, rcfg, processor, pairs / "pairs.parquet", out, cfg.system_prompt,
                         columns=columns, image_root=str(pairs))
        summary["gf"] = _gf_curve(cfg, processor, out, base, eval_rows, rcfg.train.batch_size, policies)
        return summary
    return run


def _eval_config(cfg: PipelineConfig, **overrides):
    from specs_jax.training.config import EvalConfig

    return dataclasses.replace(EvalConfig(**{k: v for k, v in cfg.eval.items() if k != "splits"}), **overrides)


def _gf_curve(cfg: PipelineConfig, processor, out: Path, base: Path, eval_rows: dict, pairs_per_step: int,
              policies: Policies) -> dict:
    """Greedy ID/OOD accuracy of the starting model and of each cold-start checkpoint; GF per point."""
    from specs_jax.metrics import gf_curve
    from specs_jax.model import load_config
    from specs_jax.training.checkpoint import Checkpointer, export_hf

    ecfg = _eval_config(cfg, num_samples=1, ks=[1])
    model_cfg = load_config(base)
    ck = Checkpointer(str(out / "train" / "checkpoints"), 100, None, "min", False)
    steps = ck.all_steps()
    ck.close()
    points = [(0, base)]
    accs = []
    tmp = Path(tempfile.mkdtemp(dir=out))
    try:
        for step in steps:
            points.append((step, export_hf(out / "train" / "checkpoints", model_cfg, tmp / str(step), step=step)))
        for _, path in points:
            res = policies.evaluate(path, eval_rows, ecfg, cfg.system_prompt, seed=0)["splits"]
            accs.append((res["id_test"]["accuracy"], res["ood_test"]["accuracy"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seen = [s * pairs_per_step for s, _ in points]
    acc_id, acc_ood = [a for a, _ in accs], [o for _, o in accs]
    curve = {"samples_seen": seen, "acc_id": acc_id, "acc_ood": acc_ood,
             "gf": [float(g) for g in gf_curve(seen, acc_id, acc_ood)]}
    write_json_atomic(out / "gf.json", curve)
    return curve


def _rbf(cfg: PipelineConfig, model_dir: Path, rows, seed: int, policies: Policies) -> dict[str, float]:
    """RBF (nucleus p = 0.95, top-32 probabilities) over the first ``n`` rollouts of the policy at the RL
    sampling temperature, for each ``n`` in ``cfg.rbf``."""
    from specs_jax.metrics import rollout_branching_factor

    rl = stage_config(cfg, "grpo_final").rl
    per_prompt = rl.group_size
    rows = rows.select(range(min(len(rows), -(-max(cfg.rbf) // per_prompt))))
    _, _, probs, masks = policies.sample(model_dir, rows, cfg.system_prompt, per_prompt, rl.temperature, seed,
                                         top_probs=32)
    width = max(p.shape[1] for p in probs)
    probs = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in probs])
    masks = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in masks])
    return {str(n): rollout_branching_factor(probs[:n], masks[:n]) for n in cfg.rbf if n <= len(probs)}


def _eval_stage(cfg: PipelineConfig, seed: int, models: dict[str, Path], eval_rows: dict, train_rows,
                rl_models: dict[str, Path], policies: Policies) -> Callable[[Path], dict]:
    def run(out: Path) -> dict:
        results = {}
        for name, path in models.items():
            target = out / f"{name}.json"
            if not target.is_file():
                write_json_atomic(target, policies.evaluate(path, eval_rows, _eval_config(cfg), cfg.system_prompt, seed))
            results[name] = json.loads(target.read_text())["splits"]
        rbf = {name: _rbf(cfg, path, train_rows, seed, policies) for name, path in rl_models.items()}
        write_json_atomic(out / "rbf.json", rbf)
        if not (out / "image_use.json").is_file():
            use = image_use(policies, models, eval_rows, cfg.system_prompt,
                            cfg.base.get("train", {}).get("train", {}).get("max_length", 256), real=results)
            write_json_atomic(out / "image_use.json", use)
        return {"models": results, "rbf": rbf}
    return run


# ---------------------------------------------------------------------------------- driver


def load_eval_rows(cfg: PipelineConfig, data: Path) -> dict:
    """The run's evaluation questions: ``{split: rows}`` from ``data/{split}.parquet`` (the data stage's
    directory), the first ``eval.max_examples`` of each split."""
    from specs_jax.data.pipeline import load_rows

    limit = cfg.eval.get("max_examples", 0)
    rows = {}
    for split in EVAL_SPLITS:
        r = load_rows(data / f"{split}.parquet")
        rows[split] = r.select(range(min(limit, len(r)))) if limit else r
    return rows


def fresh_eval_rows(cfg: PipelineConfig, n: int, seed: int) -> dict:
    """A validation draw: ``n`` new questions per evaluation split from the run's synthetic data settings with data
    seed ``seed`` (a seed the run's own splits do not use), for choices that must not look at the test splits."""
    from specs_jax.data.pipeline import load_rows
    from specs_jax.data.synth import SynthConfig, synth_dataset

    if seed == cfg.seed:
        raise ValueError(f"data seed {seed} draws the run's own test questions: give another seed")
    ds = synth_dataset(SynthConfig(**{**cfg.synth, "n_train": 1, "n_id_test": n, "n_ood_test": n, "seed": seed}))
    return {split: load_rows(ds[split]) for split in EVAL_SPLITS}


def _timings(root: Path) -> dict:
    return json.loads((root / "timings.json").read_text()) if (root / "timings.json").is_file() else {}


def prepare_shared(cfg: PipelineConfig, root: Path) -> tuple[Path, Path]:
    """The data and base model stages under ``root`` (seeded by ``cfg.seed``); returns their directories."""
    timings = _timings(root)
    _stage(root, "data", _data_stage(cfg, cfg.seed), timings)
    _stage(root, "base", _base_stage(cfg, cfg.seed, root / "data"), timings)
    return root / "data", root / "base" / "model"


def build_base(cfg: PipelineConfig, dest: Path) -> dict:
    """Train the base model of ``cfg`` (data and base stages in a scratch directory, ``base.rebuild``) and put it at
    ``dest`` with its ``build.json`` (the directory ``base.prebuilt`` names), replacing what was there only once
    the new one is complete. Returns the base stage's summary."""
    dest = Path(dest)
    cfg = dataclasses.replace(cfg, base={**cfg.base, "rebuild": True})
    with tempfile.TemporaryDirectory() as scratch:  # outside dest's tree (e.g. the repository's models/)
        _, model = prepare_shared(cfg, Path(scratch))
        staged, old = dest.with_name(f".{dest.name}.new"), dest.with_name(f".{dest.name}.old")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(model, staged)  # next to dest: the renames below stay on one file system
    staged.chmod(0o755)
    for f in staged.iterdir():
        f.chmod(0o644)
    if dest.exists():
        dest.rename(old)
    staged.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return json.loads((dest / "build.json").read_text())["summary"]


def run_seed(cfg: PipelineConfig, root: Path, seed: int, data: Path, base: Path) -> dict:
    """The stages after the base model, for one seed, under ``root``; returns the eval summary."""
    from specs_jax.data.pipeline import load_rows

    timings = _timings(root)
    eval_rows = load_eval_rows(cfg, data)
    _stage(root, "grpo_zero", _rl_stage(cfg, "grpo_zero", seed, data, base), timings)
    grpo_zero = root / "grpo_zero" / "model"
    policies = Policies(base, _eval_config(cfg).max_new_tokens)
    variants = cfg.variants
    needs_pairs = any(v.get("kind", "dpo") != "none" for v in variants.values())
    if needs_pairs:
        _stage(root, "pairs", _pairs_stage(cfg, seed, data, base, grpo_zero, policies), timings)
    models = {"base": base, "grpo_zero": grpo_zero}
    rl_models = {"grpo_zero": grpo_zero}
    single = len(variants) == 1
    for name, variant in variants.items():
        suffix = "" if single else f"_{name}"
        start = base
        if variant.get("kind", "dpo") != "none":
            _stage(root, f"cold_start{suffix}",
                   _cold_start_stage(cfg, seed, variant, root / "pairs", base, eval_rows, policies), timings)
            start = root / f"cold_start{suffix}" / "model"
            models[f"cold_start{suffix}"] = start
        _stage(root, f"grpo_final{suffix}", _rl_stage(cfg, "grpo_final", seed, data, start), timings)
        models[f"final{suffix}"] = rl_models[f"final{suffix}"] = root / f"grpo_final{suffix}" / "model"
    train_rows = load_rows(data / "train.parquet")
    return _stage(root, "eval", _eval_stage(cfg, seed, models, eval_rows, train_rows, rl_models, policies), timings)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or resume) every stage of every seed, then write the report; returns the report path."""
    from specs_jax.pipeline import report

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", dataclasses.asdict(cfg))
    if not cfg.ablation.seeds and not cfg.ablation.variants:
        run_seed(cfg, run_dir, cfg.seed, *prepare_shared(cfg, run_dir))
        return report.write_report(run_dir)
    # as in the paper, every seed starts from the same base model and data; the seed drives the rest
    data, base = prepare_shared(cfg, run_dir / "shared")
    for seed in cfg.seeds:
        root = run_dir / f"seed{seed}"
        root.mkdir(exist_ok=True)
        write_json_atomic(root / "config.json", dataclasses.asdict(cfg))
        run_seed(cfg, root, seed, data, base)
    return report.write_ablation_report(run_dir, cfg.seeds, list(cfg.variants))

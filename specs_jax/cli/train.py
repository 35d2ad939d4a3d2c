"""``specs-jax train KIND --config CONFIG.yaml [key=value ...] [--plugin FILE.py]``: one training stage.

KIND: a registered training kind (``sft``, ``dpo``, ``grpo``, ``opsd``, ``vigos``, or one a ``--plugin``
registers, see ``docs/extending.md``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (sft, dpo, grpo, opsd, vigos) from a YAML run config",
                       description="Train with a YAML run config (configs/*.yaml, merged over its base_config) and "
                                   "dotted key=value overrides, e.g. `optim.lr=1e-6 train.steps=100`. Resumes from "
                                   "the latest checkpoint in the checkpoint directory unless --no-resume. Data: "
                                   "random token ids (data.source=synthetic, sft/dpo only) or data files through "
                                   "specs_jax.data.pipeline (data.source=files, data.train_path=...): SFT rows "
                                   "(question, image, response), preference rows (+ chosen, rejected) or RL prompts "
                                   "(question, image, answer; rl.* sets the rollouts).")
    p.add_argument("kind", metavar="KIND",
                   help="sft: token-mean NLL of the response; dpo: preference loss (loss.name, default dpo_hybrid; "
                        "sigmoid/ipo/hinge/robust via loss.kwargs.loss_type) against a frozen reference; grpo: "
                        "rollouts scored by the SPECS reward, clipped policy gradient (loss.name: grpo, gspo, cispo, "
                        "dr_grpo); opsd / vigos: on-policy self-distillation from the frozen start model with "
                        "privileged contexts; or a kind registered by a --plugin")
    p.add_argument("--config", required=True, nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                   help="stage YAML (e.g. configs/dpo_tiny.yaml), then config overrides with dotted keys")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start from step 0 even if the checkpoint directory holds checkpoints")
    p.add_argument("--export-hf", metavar="DIR", help="after training, write the final parameters as an HF model")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import this Python file or module first, e.g. one that registers a loss "
                        "(@register_loss) or a training kind (@register_algorithm); repeatable")
    p.set_defaults(run=run)


def _synthetic(cfg, trainer, rows: int):
    """(train source, eval batches or None) of random token ids."""
    import jax

    from specs_jax.training.synthetic import SyntheticSource

    def source(seed: int, num_batches: int) -> SyntheticSource:
        return SyntheticSource(trainer.model_cfg, trainer.algorithm.data, rows, cfg.train.max_length, seed=seed,
                               response_fraction=cfg.data.response_fraction,
                               image_grid=tuple(cfg.data.image_grid) or None, num_batches=num_batches,
                               process=jax.process_index())

    held_out = source(cfg.train.seed + 1, cfg.data.eval_batches)
    eval_data = [next(held_out) for _ in range(cfg.data.eval_batches)] if cfg.train.eval_every else None
    return source(cfg.train.seed, cfg.data.num_batches), eval_data


def _files(cfg, data_kind: str, rows: int, processor, system_prompt: str | None = None):
    """(train iterator, eval batches or None) from :mod:`specs_jax.data.pipeline` (this process's shard)."""
    import dataclasses
    import itertools

    import jax

    from specs_jax.data.pipeline import Columns, DataConfig, batches, load_rows

    pipe = DataConfig(columns=Columns(**cfg.data.columns), batch_size=rows,
                      buckets=tuple(cfg.data.buckets) or (cfg.train.max_length,), seed=cfg.train.seed,
                      num_epochs=None, system_prompt=system_prompt, image_root=cfg.data.image_root,
                      shard_index=jax.process_index(), shard_count=jax.process_count())
    eval_data = None
    if cfg.train.eval_every and cfg.data.eval_path is not None:
        held_out = batches(load_rows(cfg.data.eval_path), processor,
                           dataclasses.replace(pipe, num_epochs=1, shuffle=False, drop_remainder=False), data_kind)
        eval_data = list(itertools.islice(held_out, cfg.data.eval_batches))
    return batches(load_rows(cfg.data.train_path), processor, pipe, data_kind), eval_data


def load_plugins(plugins: list[str]) -> None:
    """Import each plugin: a ``.py`` file path or a module name (its registrations take effect)."""
    import importlib
    import importlib.util
    from pathlib import Path

    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin)
            if not path.is_file():
                raise FileNotFoundError(f"--plugin {plugin}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(plugin)


def run(args: argparse.Namespace) -> int:
    from specs_jax.training.algorithm import get_algorithm
    from specs_jax.training.checkpoint import export_hf
    from specs_jax.training.config import load_config
    from specs_jax.training.rl import make_trainer
    from specs_jax.training.sharding import process_batch_slice

    load_plugins(args.plugin)
    data_kind = get_algorithm(args.kind).data
    cfg = load_config(args.config[0], args.config[1:])
    if cfg.model.reference == "precomputed" and get_algorithm(args.kind).takes_precomputed_reference:
        raise ValueError("model.reference=precomputed needs batches carrying reference log-probs (ref_logps); "
                         "the CLI's data sources have none (use model.reference=batch)")
    rows = process_batch_slice(cfg.train.batch_size)
    processor = None
    if cfg.data.source == "files":
        from specs_jax.data.tokenizer import load_processor

        processor = load_processor(cfg.data.processor or cfg.model.path)
    if data_kind == "rl":
        if processor is None:
            raise ValueError(f"train {args.kind} needs prompts with answers: set data.source=files and "
                             "data.train_path (question, image, answer columns)")
        if cfg.train.eval_every:
            raise ValueError("config key 'train.eval_every' is for sft/dpo (held-out loss); evaluate RL policies "
                             "with `specs-jax eval`")
    trainer = make_trainer(cfg, args.kind, processor)
    if cfg.data.source == "synthetic":
        data, eval_data = _synthetic(cfg, trainer, rows.stop - rows.start)
    else:
        system_prompt = getattr(trainer, "system_prompt", cfg.data.system_prompt)
        data, eval_data = _files(cfg, data_kind, rows.stop - rows.start, processor, system_prompt)
    history = trainer.fit(data, eval_data, resume=args.resume)
    trainer.close()
    if history:
        first, last = history[0], history[-1]
        key = trainer.algorithm.summary_metric
        print(f"train {args.kind}: steps {trainer.loop_step - len(history) + 1}..{trainer.loop_step}, "
              f"{key} {first[key]:.4f} -> {last[key]:.4f}; checkpoints in {trainer.checkpointer.directory}")
    else:
        print(f"train {args.kind}: nothing to do, checkpoint already at step {trainer.loop_step}")
    if args.export_hf:
        out = export_hf(trainer.checkpointer.directory, trainer.model_cfg, args.export_hf)
        print(f"exported step {int(trainer.state.step)} to {out}")
    return 0

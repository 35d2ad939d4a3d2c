"""``specs-jax train {sft,dpo} --config CONFIG.yaml [key=value ...]``: SFT or DPO(-hybrid) training."""

from __future__ import annotations

import argparse

from specs_jax.training.trainer import KINDS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (sft, dpo) from a YAML run config",
                       description="Train with a YAML run config (configs/*.yaml, merged over its base_config) and "
                                   "dotted key=value overrides, e.g. `optim.lr=1e-6 train.steps=100`. Resumes from "
                                   "the latest checkpoint in the checkpoint directory unless --no-resume. Data: "
                                   "random token ids (data.source=synthetic) until the datasets pipeline lands.")
    p.add_argument("kind", choices=KINDS, help="sft: token-mean NLL of the response; dpo: preference loss "
                                               "(loss.name, default dpo_hybrid) against a frozen reference")
    p.add_argument("--config", required=True, nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                   help="stage YAML (e.g. configs/dpo_tiny.yaml), then config overrides with dotted keys")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start from step 0 even if the checkpoint directory holds checkpoints")
    p.add_argument("--export-hf", metavar="DIR", help="after training, write the final parameters as an HF model")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from specs_jax.training.checkpoint import export_hf
    from specs_jax.training.config import load_config
    from specs_jax.training.sharding import process_batch_slice
    from specs_jax.training.synthetic import SyntheticSource
    from specs_jax.training.trainer import Trainer

    cfg = load_config(args.config[0], args.config[1:])
    if args.kind == "dpo" and cfg.model.reference == "precomputed":
        raise ValueError("model.reference=precomputed needs batches carrying reference log-probs; the synthetic "
                         "data source has none (use model.reference=batch)")
    trainer = Trainer(cfg, args.kind)
    rows = process_batch_slice(cfg.train.batch_size)

    def source(seed: int, num_batches: int) -> SyntheticSource:
        return SyntheticSource(trainer.model_cfg, args.kind, rows.stop - rows.start, cfg.train.max_length, seed=seed,
                               response_fraction=cfg.data.response_fraction,
                               image_grid=tuple(cfg.data.image_grid) or None, num_batches=num_batches,
                               process=jax.process_index())

    data = source(cfg.train.seed, cfg.data.num_batches)
    held_out = source(cfg.train.seed + 1, cfg.data.eval_batches)
    eval_data = [next(held_out) for _ in range(cfg.data.eval_batches)] if cfg.train.eval_every else None
    history = trainer.fit(data, eval_data, resume=args.resume)
    trainer.close()
    if history:
        first, last = history[0], history[-1]
        print(f"train {args.kind}: steps {int(trainer.state.step) - len(history) + 1}..{int(trainer.state.step)}, "
              f"loss {first['loss']:.4f} -> {last['loss']:.4f}; checkpoints in {trainer.checkpointer.directory}")
    else:
        print(f"train {args.kind}: nothing to do, checkpoint already at step {int(trainer.state.step)}")
    if args.export_hf:
        out = export_hf(trainer.checkpointer.directory, trainer.model_cfg, args.export_hf)
        print(f"exported step {int(trainer.state.step)} to {out}")
    return 0

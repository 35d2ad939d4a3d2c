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
    import jax

    from specs_jax.training.assemble import assemble_run
    from specs_jax.training.checkpoint import export_hf
    from specs_jax.training.config import load_config

    load_plugins(args.plugin)
    cfg = load_config(args.config[0], args.config[1:])
    run = assemble_run(cfg, args.kind)
    trainer = run.trainer
    history = trainer.fit(run.data, run.eval_data, resume=args.resume)
    trainer.close()
    main = jax.process_index() == 0
    if history and main:
        first, last = history[0], history[-1]
        key = trainer.algorithm.summary_metric
        print(f"train {args.kind}: steps {trainer.loop_step - len(history) + 1}..{trainer.loop_step}, "
              f"{key} {first[key]:.4f} -> {last[key]:.4f}; checkpoints in {trainer.checkpointer.directory}")
    elif main:
        print(f"train {args.kind}: nothing to do, checkpoint already at step {trainer.loop_step}")
    if args.export_hf and main:  # process 0 reads the saved checkpoint on its own and writes the HF directory
        out = export_hf(trainer.checkpointer.directory, trainer.model_cfg, args.export_hf)
        print(f"exported step {int(trainer.state.step)} to {out}")
    return 0

"""One run-assembly path: the processes of the job, the trainer and this process's data, for a run config.

``specs-jax train`` and the pipeline's training stages call :func:`assemble_run`; anything that runs a
config on several processes starts with :func:`setup_processes`. A job is one process per host (TPU pod,
GPU cluster) or several processes on one CPU machine (``mesh.coordinator_address`` / ``num_processes`` /
``process_id``, gloo collectives); every process runs the same command.

Data: each process reads only its share of the rows: ``train.batch_size / processes`` rows of every global
batch, in the order one process would read them (:mod:`specs_jax.data.pipeline`,
:class:`~specs_jax.training.synthetic.SyntheticSource`), so N processes train on exactly the batches one
process trains on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable
from typing import Any

import jax

from specs_jax.model import Qwen2_5_VLForConditionalGeneration
from specs_jax.training.algorithm import get_algorithm
from specs_jax.training.config import RunConfig, to_dict
from specs_jax.training.rl import make_trainer
from specs_jax.training.sharding import check_processes_agree, initialize_processes, process_batch_slice
from specs_jax.training.trainer import Trainer

__all__ = ["Run", "assemble_run", "config_digest", "process_data", "setup_processes"]


@dataclasses.dataclass
class Run:
    """A ready run: the trainer, this process's training batches and held-out batches (or None)."""

    trainer: Trainer
    data: Iterable[dict]
    eval_data: list[dict] | None


def config_digest(cfg: RunConfig) -> str:
    """A hash of everything in ``cfg`` that every process of a job must share (all but ``mesh.process_id``)."""
    d = to_dict(cfg)
    d["mesh"] = {k: v for k, v in d["mesh"].items() if k != "process_id"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def setup_processes(cfg: RunConfig) -> None:
    """Join the job's processes (:func:`~specs_jax.training.sharding.initialize_processes`) and check that
    they run the same config; ``ValueError`` naming what differs otherwise."""
    initialize_processes(cfg.mesh)
    check_processes_agree(config=config_digest(cfg), processes=jax.process_count(), devices=jax.device_count())


def process_data(cfg: RunConfig, data_kind: str, model_cfg: Any, processor: Any = None,
                 system_prompt: str | None = None) -> tuple[Iterable[dict], list[dict] | None]:
    """(training batches, held-out batches or None) of this process for batches of ``data_kind``
    (``sft`` | ``preference`` | ``rl``): random ones (``data.source=synthetic``) or the files of
    ``data.train_path`` / ``data.eval_path`` through :mod:`specs_jax.data.pipeline`."""
    rows = process_batch_slice(cfg.train.batch_size)
    local = rows.stop - rows.start
    if cfg.data.source == "synthetic":
        from specs_jax.training.synthetic import SyntheticSource

        def source(seed: int, num_batches: int) -> SyntheticSource:
            return SyntheticSource(model_cfg, data_kind, local, cfg.train.max_length, seed=seed,
                                   response_fraction=cfg.data.response_fraction,
                                   image_grid=tuple(cfg.data.image_grid) or None, num_batches=num_batches,
                                   process=jax.process_index(), process_count=jax.process_count())

        held_out = source(cfg.train.seed + 1, cfg.data.eval_batches)
        eval_data = [next(held_out) for _ in range(cfg.data.eval_batches)] if cfg.train.eval_every else None
        return source(cfg.train.seed, cfg.data.num_batches), eval_data

    from specs_jax.data.pipeline import Columns, DataConfig, batches, load_rows

    pipe = DataConfig(columns=Columns(**cfg.data.columns), batch_size=local,
                      buckets=tuple(cfg.data.buckets) or (cfg.train.max_length,), seed=cfg.train.seed,
                      num_epochs=None, system_prompt=system_prompt, image_root=cfg.data.image_root,
                      shard_index=jax.process_index(), shard_count=jax.process_count(), format=cfg.data.format,
                      override_data_system=cfg.data.override_data_system)
    train_rows = load_rows(cfg.data.train_path)
    check_processes_agree(train_rows=len(train_rows))
    eval_data = None
    if cfg.train.eval_every and cfg.data.eval_path is not None:
        held_out = batches(load_rows(cfg.data.eval_path), processor,
                           dataclasses.replace(pipe, num_epochs=1, shuffle=False, drop_remainder=False), data_kind)
        eval_data = list(itertools.islice(held_out, cfg.data.eval_batches))
    return batches(train_rows, processor, pipe, data_kind), eval_data


def assemble_run(cfg: RunConfig, kind: str, processor: Any = None,
                 model: Qwen2_5_VLForConditionalGeneration | None = None) -> Run:
    """The processes, the trainer of training kind ``kind`` (:func:`~specs_jax.training.rl.make_trainer`) and
    this process's data for ``cfg``. ``processor``: the tokenizer + image processor of file data (default:
    ``data.processor`` or ``model.path`` when ``data.source=files``); ``model``: a starting policy already
    in memory (default: ``model.path`` / ``model.preset``)."""
    setup_processes(cfg)
    algorithm = get_algorithm(kind)
    if cfg.model.reference == "precomputed" and algorithm.takes_precomputed_reference:
        raise ValueError("model.reference=precomputed needs batches carrying reference log-probs (ref_logps); "
                         "the run's data sources have none (use model.reference=batch)")
    if processor is None and cfg.data.source == "files":
        from specs_jax.data.tokenizer import load_processor

        processor = load_processor(cfg.data.processor or cfg.model.path)
    if algorithm.data == "rl":
        if cfg.data.source != "files":
            raise ValueError(f"train {kind} needs prompts with answers: set data.source=files and "
                             "data.train_path (question, image, answer columns)")
        if cfg.train.eval_every:
            raise ValueError("config key 'train.eval_every' is for sft/dpo (held-out loss); evaluate RL policies "
                             "with `specs-jax eval`")
    trainer = make_trainer(cfg, kind, processor, model)
    data, eval_data = process_data(cfg, algorithm.data, trainer.model_cfg, processor, trainer.system_prompt)
    return Run(trainer, data, eval_data)

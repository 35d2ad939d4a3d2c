"""The training loop: model + mesh + state + jitted step + data + checkpoints + logging.

Data: any iterable of host-side numpy batch dicts (:mod:`specs_jax.training.batches`, the format
of :mod:`specs_jax.data.pipeline`), one per optimizer step, holding this process's rows of the
global batch. For an exact resume the source provides grain's ``get_state() -> dict`` (JSON) and
``set_state(dict)``; a source without them is resumed by skipping the batches already consumed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from specs_jax.model import ModelConfig, Qwen2_5_VLForConditionalGeneration, load_preset
from specs_jax.training.algorithm import Algorithm, get_algorithm
from specs_jax.training.batches import SeqBatch
from specs_jax.training.checkpoint import Checkpointer
from specs_jax.training.config import RunConfig, to_dict
from specs_jax.training.logging import MetricLogger, check_finite
from specs_jax.training.sharding import allgather_json, initialize_processes, make_mesh, make_rules
from specs_jax.training.state import (
    FROZEN_VISION_PATH,
    create_state,
    join_params,
    lr_schedule,
    make_optimizer,
    state_shardings,
)
from specs_jax.training.steps import LossSpec, make_eval_step, make_train_step, sequence_logps

__all__ = ["Trainer", "build_model"]


def build_model(cfg: RunConfig) -> Qwen2_5_VLForConditionalGeneration:
    """The policy of ``cfg.model``: loaded from ``path`` or randomly initialised from ``preset`` (seed
    ``train.seed``)."""
    m = cfg.model
    if m.path is not None:
        from specs_jax.convert.io import load_model

        return load_model(m.path, **m.options())
    model_cfg = load_preset(m.preset, **m.options())
    return Qwen2_5_VLForConditionalGeneration(model_cfg, rngs=nnx.Rngs(cfg.train.seed))


def _matmul_params(model: Qwen2_5_VLForConditionalGeneration) -> int:
    """Parameters used in per-token matmuls of the decoder: all but the vision tower, minus the
    embedding table when it is not also the LM head."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    n = sum(x.size for x in jax.tree.leaves(params))
    n -= sum(x.size for x in jax.tree.leaves(params[FROZEN_VISION_PATH[0]][FROZEN_VISION_PATH[1]]))
    if not model.config.tie_word_embeddings:
        n -= model.config.text.vocab_size * model.config.text.hidden_size
    return n


def _process_data_state(saved: dict[str, Any], data: Any) -> dict[str, Any]:
    """This process's data state from a checkpoint's: its own when the job has as many processes as the one that
    saved it, else the source's ``rescale_state`` of all of them (an N-process checkpoint in an M-process job)."""
    states = saved["processes"] if "processes" in saved else [saved]  # checkpoints before per-process states
    count = jax.process_count()
    if len(states) == count:
        return states[jax.process_index()]
    if not hasattr(data, "rescale_state"):
        raise ValueError(f"the checkpoint was written by {len(states)} processes and this job has {count}; "
                         f"{type(data).__name__} cannot move its data position between process counts")
    return data.rescale_state(states, count)


class Trainer:
    """Training of a Qwen2.5-VL model as configured by a :class:`RunConfig`, for any training kind whose
    :class:`~specs_jax.training.algorithm.Algorithm` trains on fixed batches (``sft``, ``dpo``, ...; the
    kinds that roll out run in :class:`~specs_jax.training.rl.RLTrainer`; :func:`~specs_jax.training.rl.make_trainer`
    picks the right one).

    ``model``: the policy (default: :func:`build_model`; a given model brings its own dtypes and remat
    policy, ``cfg.model.path/preset/dtype/param_dtype/remat`` are then unused); ``mesh``: default
    ``cfg.mesh`` over all devices; ``processor``: passed to the algorithm (rollout kinds decode with it).
    When the algorithm has a reference (:attr:`Algorithm.reference`), the steps get a frozen copy of the
    starting parameters as ``extra``.
    """

    rolls_out = False  # which algorithms this loop runs (Algorithm.rolls_out)

    def __init__(self, cfg: RunConfig, kind: str, model: Qwen2_5_VLForConditionalGeneration | None = None,
                 mesh: Mesh | None = None, processor: Any = None):
        algorithm_cls = get_algorithm(kind)
        if (algorithm_cls.data == "rl") != self.rolls_out:
            loop = "RLTrainer" if algorithm_cls.data == "rl" else "Trainer"
            raise ValueError(f"training kind {kind!r} trains on {algorithm_cls.data} batches: it runs in {loop} "
                             f"(specs_jax.training.rl.make_trainer picks the loop), not {type(self).__name__}")
        self.cfg, self.kind = cfg, kind
        initialize_processes(cfg.mesh)
        self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) if mesh is None else mesh
        rules = make_rules(cfg.mesh.rules)
        model = build_model(cfg) if model is None else model
        self.model_cfg: ModelConfig = model.config
        self.graphdef = nnx.graphdef(model)
        self.algorithm: Algorithm = algorithm_cls(cfg, self.graphdef, self.model_cfg, processor)
        self.updates_per_step = self.algorithm.updates_per_step
        total_updates = cfg.train.steps * self.updates_per_step
        self.tx = make_optimizer(cfg.optim, total_updates)
        self.schedule = lr_schedule(cfg.optim, total_updates)
        freeze = cfg.model.freeze_vision
        self.shardings = state_shardings(model, self.tx, freeze, self.mesh, rules)
        self.state = create_state(model, self.tx, self.shardings, freeze, cfg.train.seed)
        self.extra = self.extra_shardings = None
        if self.algorithm.reference:
            self.extra_shardings = join_params(self.shardings.params, self.shardings.frozen)
            self.extra = jax.tree.map(lambda x: x.copy(), join_params(self.state.params, self.state.frozen))
        self.spec: LossSpec = self.algorithm.spec()
        self.flops_per_token = self.algorithm.flops_factor() * _matmul_params(model)
        self.last_tokens = 0.0  # tokens processed by the last train_step (throughput)
        self._step_fns: dict[Any, tuple] = {}
        del model
        ck = cfg.checkpoint
        ck_dir = ck.dir or str(Path(cfg.train.output_dir) / "checkpoints")
        self.checkpointer = Checkpointer(ck_dir, ck.keep_last_n, ck.keep_best_metric, ck.best_mode, ck.async_save,
                                         model=self.model_cfg, model_files=cfg.model.path or cfg.data.processor)

    @property
    def system_prompt(self) -> str | None:
        """The system message the batches must be tokenised with: the algorithm's own (e.g. ViGOS's format
        instruction), else ``data.system_prompt``."""
        own = self.algorithm.system_prompt
        return self.cfg.data.system_prompt if own is None else own

    # ---------------------------------------------------------------------------------------
    # batches and steps
    # ---------------------------------------------------------------------------------------

    def prepare(self, batch: dict[str, np.ndarray], accum: int | None = None) -> SeqBatch:
        """This process's host batch dict -> the global, sharded step batch ``[accum, rows, ...]`` (each process
        contributes its rows, images included)."""
        accum = self.cfg.optim.grad_accum_steps if accum is None else accum
        local = self.algorithm.prepare(batch, accum)
        shardings = self.algorithm.shardings(local, self.mesh)
        return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x)
                            if s.spec != PartitionSpec() else jax.device_put(x, s), local, shardings)

    def _fns(self, batch: SeqBatch) -> tuple:
        """(train step, eval step) for the batch's structure (built once per structure)."""
        key = jax.tree.structure(batch)
        if key not in self._step_fns:
            sh = jax.tree.map(lambda x: x.sharding, batch)
            self._step_fns[key] = (
                make_train_step(self.graphdef, self.spec, self.tx, self.schedule, self.shardings, sh,
                                self.extra_shardings),
                make_eval_step(self.graphdef, self.spec, self.shardings, sh, self.extra_shardings))
        return self._step_fns[key]

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a host batch; returns the metrics as floats (raises on NaN/Inf)."""
        self.algorithm.check_batch(batch)
        rows = self.algorithm.rows(batch)
        if rows * jax.process_count() != self.cfg.train.batch_size:
            unit = self.algorithm.batch_unit
            raise ValueError(f"batch of {rows} {unit} on each of {jax.process_count()} process(es), but "
                             f"train.batch_size={self.cfg.train.batch_size}")
        prepared = self.prepare(batch)
        step = int(self.state.step)
        self.state, metrics = self._fns(prepared)[0](self.state, prepared, self.extra)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step + 1, metrics)
        self.last_tokens = float(np.asarray(batch["attention_mask"]).sum()) * jax.process_count()
        return metrics

    def evaluate(self, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
        """Batch-mean loss and metrics over ``batches`` (``eval/`` prefixed), no update."""
        sums: dict[str, float] = {}
        n = 0
        for batch in batches:
            self.algorithm.check_batch(batch)
            prepared = self.prepare(batch, accum=1)
            out = jax.device_get(self._fns(prepared)[1](self.state, prepared, self.extra))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        if not n:
            raise ValueError("evaluation data is empty")
        return {f"eval/{k}": v / n for k, v in sums.items()}

    def precompute_reference(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """The batches with ``ref_logps`` (``[rows, T]``) of the current policy, for algorithms that take a
        precomputed reference (DPO: call before training, then train with ``model.reference=precomputed``)."""
        if not self.algorithm.takes_precomputed_reference:
            raise ValueError(f"training kind {self.kind!r} takes no precomputed reference log-probs")
        fn = jax.jit(lambda params, seq: sequence_logps(nnx.merge(self.graphdef, nnx.State(params)), seq))
        params = join_params(self.state.params, self.state.frozen)
        for batch in batches:
            seq = jax.tree.map(lambda x: x[0], self.prepare(batch, accum=1))
            logps = np.asarray(jax.device_get(fn(params, seq)))  # rows in the step batch's order
            yield {**batch, "ref_logps": logps[np.argsort(self.algorithm.row_order(batch))]}

    # ---------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------

    def resume(self, data: Any) -> int:
        """Restore the latest checkpoint (state and data position) if there is one; returns its step."""
        if self.checkpointer.latest_step() is None:
            return 0
        self.state, data_state = self.checkpointer.restore(self.state)
        if hasattr(data, "set_state"):
            data.set_state(_process_data_state(data_state, data))
        return self.loop_step

    @property
    def loop_step(self) -> int:
        """Loop steps done (optimizer updates / updates_per_step)."""
        return int(self.state.step) // self.updates_per_step

    def _data_state(self, data: Any, consumed: int) -> dict[str, Any]:
        """The data position of every process (``processes``: one state per process, in process order)."""
        own = data.get_state() if hasattr(data, "get_state") else {"batches_consumed": consumed}
        return {"processes": allgather_json(own)}

    def fit(self, data: Iterable[dict[str, np.ndarray]], eval_data: Iterable | None = None,
            resume: bool = True) -> list[dict[str, float]]:
        """Train to ``train.steps``; returns the metrics of the steps run. Checkpoints every
        ``checkpoint.every`` steps and at the end; evaluates every ``train.eval_every`` steps on
        ``eval_data`` (re-iterated each time). A NaN/Inf loss stops the run before anything is saved."""
        cfg = self.cfg
        if not resume and self.checkpointer.latest_step() is not None:
            raise ValueError(f"{self.checkpointer.directory} already holds checkpoints (steps "
                             f"{self.checkpointer.all_steps()}); resume, or set another checkpoint.dir")
        start = self.resume(data) if resume else 0
        it = iter(data)
        if start and not hasattr(data, "set_state"):
            for _ in range(start):
                next(it)
        logger = MetricLogger(cfg.train.output_dir, cfg.train.steps, start, jsonl=cfg.log.jsonl,
                              tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                              wandb_project=cfg.log.wandb_project, progress=cfg.log.progress,
                              flops_per_token=self.flops_per_token, config=to_dict(cfg))
        history = []
        try:
            for step in range(start + 1, cfg.train.steps + 1):
                batch = next(it)
                t0 = time.perf_counter()
                metrics = self.train_step(batch)
                seconds = time.perf_counter() - t0
                if cfg.train.eval_every and eval_data is not None and step % cfg.train.eval_every == 0:
                    metrics.update(self.evaluate(eval_data))
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    metrics = logger.log(step, metrics, self.last_tokens, seconds)
                logger.advance()
                history.append(metrics)
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
                    self.checkpointer.save(self.state, self._data_state(data, step), metrics)
        finally:
            self.checkpointer.wait()
            logger.close()
        return history

    def close(self) -> None:
        self.checkpointer.close()


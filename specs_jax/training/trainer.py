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
from specs_jax.training.batches import SeqBatch, prepare_dpo, prepare_sft
from specs_jax.training.checkpoint import Checkpointer
from specs_jax.training.config import RunConfig, to_dict
from specs_jax.training.logging import MetricLogger, check_finite
from specs_jax.training.sharding import make_mesh, make_rules, maybe_initialize_distributed
from specs_jax.training.state import (
    FROZEN_VISION_PATH,
    create_state,
    join_params,
    lr_schedule,
    make_optimizer,
    state_shardings,
)
from specs_jax.training.steps import (
    LossSpec,
    batch_shardings,
    dpo_spec,
    make_eval_step,
    make_train_step,
    sequence_logps,
    sft_spec,
)

__all__ = ["KINDS", "RL_KINDS", "Trainer", "build_model"]

KINDS = ("sft", "dpo")  # supervised kinds: this Trainer
RL_KINDS = ("grpo", "opsd", "vigos")  # rollout kinds: specs_jax.training.rl.RLTrainer


def build_model(cfg: RunConfig) -> Qwen2_5_VLForConditionalGeneration:
    """The policy of ``cfg.model``: loaded from ``path`` or randomly initialised from ``preset`` (seed
    ``train.seed``)."""
    m = cfg.model
    if m.path is not None:
        from specs_jax.convert.io import load_model

        return load_model(m.path, m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)
    model_cfg = load_preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)
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


class Trainer:
    """SFT or DPO training of a Qwen2.5-VL model as configured by a :class:`RunConfig`.

    ``model``: the policy (default: :func:`build_model`; a given model brings its own dtypes and remat
    policy, ``cfg.model.path/preset/dtype/param_dtype/remat`` are then unused); ``mesh``: default
    ``cfg.mesh`` over all devices. The DPO reference is a frozen copy of the
    starting policy (``model.reference=batch``: log-probs computed in every step) or log-probs
    already in the batches (``precomputed``, see :meth:`precompute_reference`).
    """

    kinds: tuple[str, ...] = KINDS
    updates_per_step = 1  # optimizer updates per loop step (RL: rl.num_iterations per rollout batch)

    def __init__(self, cfg: RunConfig, kind: str, model: Qwen2_5_VLForConditionalGeneration | None = None,
                 mesh: Mesh | None = None):
        if kind not in self.kinds:
            raise ValueError(f"training kind {kind!r}; expected one of {self.kinds}")
        if kind == "sft" and cfg.loss.kwargs:
            raise ValueError(f"config key 'loss.kwargs' is for `train dpo`; SFT is token-mean NLL without options, "
                             f"got {cfg.loss.kwargs}")
        self.cfg, self.kind = cfg, kind
        maybe_initialize_distributed(cfg.mesh.distributed)
        self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) if mesh is None else mesh
        rules = make_rules(cfg.mesh.rules)
        model = build_model(cfg) if model is None else model
        self.model_cfg: ModelConfig = model.config
        self.graphdef = nnx.graphdef(model)
        total_updates = cfg.train.steps * self.updates_per_step
        self.tx = make_optimizer(cfg.optim, total_updates)
        self.schedule = lr_schedule(cfg.optim, total_updates)
        freeze = cfg.model.freeze_vision
        self.shardings = state_shardings(model, self.tx, freeze, self.mesh, rules)
        self.state = create_state(model, self.tx, self.shardings, freeze, cfg.train.seed)
        self.extra = self.extra_shardings = None
        if self.uses_reference():
            self.extra_shardings = join_params(self.shardings.params, self.shardings.frozen)
            self.extra = jax.tree.map(lambda x: x.copy(), join_params(self.state.params, self.state.frozen))
        self.spec: LossSpec = self.build_spec(model)
        self.flops_per_token = self.flops_factor() * _matmul_params(model)
        self.last_tokens = 0.0  # tokens processed by the last train_step (throughput)
        self._step_fns: dict[Any, tuple] = {}
        del model
        ck = cfg.checkpoint
        ck_dir = ck.dir or str(Path(cfg.train.output_dir) / "checkpoints")
        self.checkpointer = Checkpointer(ck_dir, ck.keep_last_n, ck.keep_best_metric, ck.best_mode, ck.async_save)

    def uses_reference(self) -> bool:
        """Whether the steps get a frozen copy of the starting parameters as ``extra``."""
        return self.kind == "dpo" and self.cfg.model.reference == "batch"

    def build_spec(self, model: Qwen2_5_VLForConditionalGeneration) -> LossSpec:
        """The loss of this kind (``model``: the starting policy, e.g. for a sampler)."""
        return sft_spec() if self.kind == "sft" else dpo_spec(self.graphdef, self.cfg.loss.name, **self.cfg.loss.kwargs)

    def flops_factor(self) -> int:
        """Model FLOPs per token per matmul parameter of one step: 6 (forward + backward) + 2 per extra forward."""
        return 6 + (2 if self.extra is not None else 0)

    # ---------------------------------------------------------------------------------------
    # batches and steps
    # ---------------------------------------------------------------------------------------

    def prepare(self, batch: dict[str, np.ndarray], accum: int | None = None) -> SeqBatch:
        """Host batch dict -> global, sharded :class:`SeqBatch` ``[accum, rows, ...]``."""
        accum = self.cfg.optim.grad_accum_steps if accum is None else accum
        prepare = prepare_sft if self.kind == "sft" else prepare_dpo
        local = prepare(self.model_cfg, batch, accum)
        if jax.process_count() > 1 and local.inputs.vision is not None:
            raise ValueError("multi-process training with images needs every process to hold all images of the "
                             "global batch; not supported yet")
        shardings = batch_shardings(local, self.mesh)
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

    def _check_reference(self, batch: dict[str, np.ndarray]) -> None:
        """A DPO batch carries reference log-probs exactly when ``model.reference=precomputed``."""
        if self.kind != "dpo":
            return
        has_ref = batch.get("ref_logps") is not None
        if self.extra is None and not has_ref:
            raise ValueError("model.reference=precomputed but the batch has no ref_logps "
                             "(see Trainer.precompute_reference)")
        if self.extra is not None and has_ref:
            raise ValueError("the batch carries precomputed reference log-probs but model.reference=batch; "
                             "set model.reference=precomputed to use them")

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a host batch; returns the metrics as floats (raises on NaN/Inf)."""
        self._check_reference(batch)
        rows = len(batch["input_ids"]) // (1 if self.kind == "sft" else 2)
        if rows * jax.process_count() != self.cfg.train.batch_size:
            unit = "rows" if self.kind == "sft" else "pairs"
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
            self._check_reference(batch)
            prepared = self.prepare(batch, accum=1)
            out = jax.device_get(self._fns(prepared)[1](self.state, prepared, self.extra))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        if not n:
            raise ValueError("evaluation data is empty")
        return {f"eval/{k}": v / n for k, v in sums.items()}

    def precompute_reference(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """DPO: the batches with ``ref_logps [2B, T]`` of the current policy (call before training, then
        train with ``model.reference=precomputed``)."""
        if self.kind != "dpo":
            raise ValueError("precompute_reference is for DPO training")
        fn = jax.jit(lambda params, seq: sequence_logps(nnx.merge(self.graphdef, nnx.State(params)), seq))
        params = join_params(self.state.params, self.state.frozen)
        for batch in batches:
            seq = jax.tree.map(lambda x: x[0], self.prepare(batch, accum=1))
            yield {**batch, "ref_logps": np.asarray(jax.device_get(fn(params, seq)))}

    # ---------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------

    def resume(self, data: Any) -> int:
        """Restore the latest checkpoint (state and data position) if there is one; returns its step."""
        if self.checkpointer.latest_step() is None:
            return 0
        self.state, data_state = self.checkpointer.restore(self.state)
        if hasattr(data, "set_state"):
            data.set_state(data_state)
        return self.loop_step

    @property
    def loop_step(self) -> int:
        """Loop steps done (optimizer updates / updates_per_step)."""
        return int(self.state.step) // self.updates_per_step

    def _data_state(self, data: Any, consumed: int) -> dict[str, Any]:
        return data.get_state() if hasattr(data, "get_state") else {"batches_consumed": consumed}

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


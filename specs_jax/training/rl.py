"""The rollout loop: RL training kinds (``grpo``, ``opsd``, ``vigos``, and any registered algorithm with
``data = "rl"``): one loop step = rollout -> rewards -> update(s).

Per loop step, for a prompt batch of :func:`specs_jax.data.pipeline.rl_batches` (``train.batch_size``
prompts; ``input_ids`` left-padded, ``answer``, images), :meth:`RLTrainer.train_step` runs two phases:

:meth:`RLTrainer.collect`
  1. the sampler's rollout engine draws ``rl.group_size`` completions per prompt from the CURRENT weights,
     resharded into the rollout layout (``rl.rollout_mesh``, :mod:`specs_jax.sampling.layout`; ``trainer``:
     the trainer's sharded params as they are), in at most ``rl.max_slots`` / ``rl.kv_cache_gib`` decode slots,
     seed ``hash(train.seed, step)``, so a resumed run samples exactly what an uninterrupted one does;
  2. the SPECS reward (``R_format + R_acc``, :func:`specs_jax.rewards.score_batch`) scores them and
     :func:`~specs_jax.losses.group_advantages` turns rewards into advantages (``rl.scale_rewards``);
  3. with ``rl.accuracy_filter = [lo, hi]`` (METHOD.md section 2, the online filter) the groups whose
     accuracy is outside ``[lo, hi]`` get an all-zero loss mask, so they add nothing to the loss or
     its token count (shapes stay static: no recompilation);
  4. the algorithm (:meth:`~specs_jax.training.algorithm.Algorithm.sequences`) turns the rollout into its
     host step batch;

:meth:`RLTrainer.update`
  ``rl.num_iterations`` optimizer updates on it (the old log-probs are the sampler's, or the trainer's
  when the algorithm refreshes them); when no group is left the updates are skipped and only the step
  counter moves.

``state.step`` counts optimizer updates; loop step ``k`` ends at update ``k * num_iterations``.

Several processes (one per host): each holds ``train.batch_size / processes`` whole prompts (a group never
spans processes). The rollout is one program on the global mesh over every process's prompts, gathered in
process order (:meth:`~specs_jax.sampling.Sampler.generate_ids`), so it draws exactly the samples one process
draws; each process then decodes, scores and computes the advantages and the accuracy filter of its own groups,
and builds its rows of the step batch. The rollout metrics are those of all rows (gathered); the updates skip
only when no process kept a group.
The algorithms: ``grpo`` in :mod:`specs_jax.training.grpo`; ``opsd`` and ``vigos`` in
:mod:`specs_jax.training.distill`.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from specs_jax.model import Qwen2_5_VLForConditionalGeneration
from specs_jax.rewards import RewardBatch, score_batch
from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams
from specs_jax.sampling.layout import (device_bytes, param_bytes, parse_rollout_mesh, reshard, rollout_mesh,
                                       rollout_shardings, rollout_tensor_size)
from specs_jax.training.algorithm import get_algorithm
from specs_jax.training.config import RunConfig
from specs_jax.training.grpo import ScoredRollout, rollout
from specs_jax.training.logging import check_finite
from specs_jax.training.sharding import agree_max, allgather_rows, make_rules
from specs_jax.training.state import join_params, model_from_params
from specs_jax.training.steps import under_mesh
from specs_jax.training.trainer import Trainer, build_model

__all__ = ["Collected", "RLTrainer", "accuracy_filter_mask", "make_trainer", "rollout_seed"]


def rollout_seed(seed: int, step: int) -> int:
    """Sampling seed of loop step ``step`` (1-based) of a run with ``train.seed = seed``."""
    return zlib.crc32(f"{seed}:{step}".encode())


def accuracy_filter_mask(correct: np.ndarray, group_size: int, band: tuple[float, float] | list) -> np.ndarray:
    """``[R]`` bool: rows whose group's accuracy ``mean(correct over the group)`` lies in ``band = [lo, hi]``
    (all rows when ``band`` is empty). ``correct [R]`` is prompt-major (``group_size`` rows per prompt)."""
    correct = np.asarray(correct, bool)
    if not len(band):
        return np.ones(correct.shape, bool)
    lo, hi = band
    acc = correct.reshape(-1, group_size).mean(1)
    keep = (acc >= lo) & (acc <= hi)
    return np.repeat(keep, group_size)


def _scored(ro: ScoredRollout, scores: RewardBatch, keep: np.ndarray, group_size: int) -> dict[str, float]:
    """Rollout metrics of the whole job's rows (every process's, gathered): reward mean/std, format rate,
    accuracy, lengths, kept share, group diversity."""
    lengths = ro.generation.mask.sum(1)
    rows = np.stack([ro.rewards, scores.format, scores.accuracy, lengths,
                     lengths == ro.generation.tokens.shape[1], keep], 1).astype(np.float64)
    rewards, fmt, accuracy, lengths, truncated, keep = allgather_rows(rows).T
    flat = rewards.reshape(-1, group_size)  # groups never span processes
    return {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
        "reward/format_rate": float((fmt > 0).mean()),
        "reward/accuracy": float((accuracy > 0).mean()),
        "rollout/length_mean": float(lengths.mean()), "rollout/length_max": float(lengths.max()),
        "rollout/truncated": float(truncated.mean()),
        "rollout/groups_kept": float(keep.mean()),
        "rollout/groups_all_equal": float((flat.std(1) == 0).mean()),
    }


class Collected(NamedTuple):
    """The collect phase of an RL step: the algorithm's host step batch (``loss_mask`` filtered), the scored
    rollout, and the rollout metrics."""

    seqs: dict
    rollout: ScoredRollout
    metrics: dict[str, float]


class RLTrainer(Trainer):
    """The rollout loop (module docstring) for the algorithms with ``data = "rl"``. ``processor``: the
    :class:`~specs_jax.data.tokenizer.Processor` that decodes the completions (and builds teacher
    contexts); the prompt batches come tokenised by the same processor."""

    rolls_out = True

    def __init__(self, cfg: RunConfig, kind: str, processor: Any,
                 model: Qwen2_5_VLForConditionalGeneration | None = None, mesh: Mesh | None = None):
        model = build_model(cfg) if model is None else model
        # the sampler needs the model's structure and config only: its weights come from the train state
        abstract = nnx.merge(nnx.graphdef(model), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                               nnx.state(model)))
        self.sampling = SamplingParams(temperature=cfg.rl.temperature, top_k=cfg.rl.top_k, top_p=cfg.rl.top_p)
        self.processor = processor
        super().__init__(cfg, kind, model, mesh, processor)
        self._refresh_fns: dict[Any, Any] = {}
        self.rollout_mesh, self.rollout_shardings = self._rollout_layout(abstract)
        groups = 1 if self.rollout_mesh is None else self.rollout_mesh.shape["data"]
        budget = None if cfg.rl.kv_cache_gib is None else cfg.rl.kv_cache_gib * groups
        self.sampler = Sampler(abstract, processor, SamplerConfig(max_new_tokens=cfg.rl.max_new_tokens,
                                                                  max_slots=cfg.rl.max_slots, kv_cache_gib=budget))

    def _rollout_layout(self, abstract: Qwen2_5_VLForConditionalGeneration) -> tuple[Mesh | None, dict | None]:
        """The rollout mesh and parameter shardings of ``rl.rollout_mesh`` (:mod:`specs_jax.sampling.layout`), or
        ``(None, None)``: decode on the trainer's layout."""
        choice = parse_rollout_mesh(self.cfg.rl.rollout_mesh)
        if choice == "trainer":
            return None, None
        devices = list(self.mesh.devices.flat)
        tensor = choice if choice != "auto" else rollout_tensor_size(
            param_bytes(nnx.state(abstract, nnx.Param), abstract.config.dtype), device_bytes(), len(devices),
            jax.local_device_count())
        mesh = rollout_mesh(devices, tensor)
        return mesh, rollout_shardings(abstract, mesh, make_rules(self.cfg.mesh.rules))

    @property
    def scale_rewards(self) -> str:
        """Advantage scaling: ``rl.scale_rewards``, else the loss's own (``scale_rewards`` attribute of the loss
        function, e.g. ``none`` for Dr. GRPO), else ``group``."""
        return self.cfg.rl.scale_rewards or getattr(self.algorithm.loss_fn, "scale_rewards", "group")

    def train_step(self, prompts: dict[str, Any]) -> dict[str, float]:
        """One loop step on a prompt batch: :meth:`collect`, then :meth:`update`."""
        t0 = time.perf_counter()
        collected = self.collect(prompts)
        t1 = time.perf_counter()
        metrics = {**collected.metrics, **self.update(collected.seqs)}
        t2 = time.perf_counter()
        metrics.update({"time/rollout_s": t1 - t0, "time/update_s": t2 - t1})
        ro = collected.rollout
        self.last_tokens = float(ro.generation.mask.sum() + ro.generation.prompt_mask.sum()) * jax.process_count()
        self.last_rollout = ro
        return metrics

    def collect(self, prompts: dict[str, Any]) -> Collected:
        """Rollout from the current weights, scoring, advantages, the accuracy filter and the algorithm's
        step batch, for the next loop step."""
        cfg, rl = self.cfg, self.cfg.rl
        if len(prompts["input_ids"]) * jax.process_count() != cfg.train.batch_size:
            raise ValueError(f"prompt batch of {len(prompts['input_ids'])} rows on each of {jax.process_count()} "
                             f"process(es), but train.batch_size={cfg.train.batch_size}")
        scores: list[RewardBatch] = []
        score_s = [0.0]

        def reward(gen, answers):
            start = time.perf_counter()
            scores.append(score_batch(gen.texts, answers))
            score_s[0] = time.perf_counter() - start
            return scores[-1].total

        weights = join_params(self.state.params, self.state.frozen)
        seed = rollout_seed(cfg.train.seed, self.loop_step + 1)
        if self.rollout_mesh is None:
            ro = rollout(self.sampler, prompts, group_size=rl.group_size, params=self.sampling, seed=seed,
                         weights=weights, reward_fn=reward, scale=self.scale_rewards)
        else:  # decode on the rollout layout: a copy resharded once per step, dropped after the rollout
            with jax.set_mesh(self.rollout_mesh):
                ro = rollout(self.sampler, prompts, group_size=rl.group_size, params=self.sampling, seed=seed,
                             weights=reshard(weights, self.rollout_shardings, self.model_cfg.dtype),
                             reward_fn=reward,
                             scale=self.scale_rewards)
        keep = accuracy_filter_mask(scores[0].accuracy > 0, rl.group_size, rl.accuracy_filter)
        seqs = self.algorithm.sequences(prompts, ro)
        seqs["loss_mask"] = np.where(keep[:, None], seqs["loss_mask"], 0)
        metrics = {**_scored(ro, scores[0], keep, rl.group_size), "time/score_s": score_s[0]}
        return Collected(seqs, ro, metrics)

    def _refresh(self, prepared: Any) -> Any:
        """The step batch after the algorithm's :meth:`refresh` with the current policy (once per rollout)."""
        key = jax.tree.structure(prepared)
        if key not in self._refresh_fns:
            first = jax.eval_shape(lambda p: self.algorithm.refresh(model_from_params(self.graphdef, p),
                                                                    jax.tree.map(lambda x: x[0], prepared)),
                                   join_params(self.state.params, self.state.frozen))
            if first is None:
                self._refresh_fns[key] = None
            else:
                def fn(params, batch):
                    model = model_from_params(self.graphdef, params)
                    return jax.lax.map(lambda micro: self.algorithm.refresh(model, micro), batch)

                sh = jax.tree.map(lambda x: x.sharding, prepared)
                params_sh = join_params(self.shardings.params, self.shardings.frozen)
                self._refresh_fns[key] = under_mesh(jax.jit(fn, in_shardings=(params_sh, sh), out_shardings=sh),
                                                     self.mesh)
        fn = self._refresh_fns[key]
        return prepared if fn is None else fn(join_params(self.state.params, self.state.frozen), prepared)

    def update(self, seqs: dict[str, Any]) -> dict[str, float]:
        """``rl.num_iterations`` optimizer updates on a host step batch (:meth:`Algorithm.sequences`; this process's
        rows); the metrics of the last one. An all-zero ``loss_mask`` on every process (every group filtered) skips
        the updates:
        only the step counter moves, the weights and the optimizer state stay."""
        if not agree_max(np.asarray(seqs["loss_mask"]).any())[0]:  # on no process
            self.state = self.state._replace(step=self.state.step + self.updates_per_step)
            return {}
        prepared = self._refresh(self.prepare(seqs))
        fn = self._fns(prepared)[0]
        for _ in range(self.updates_per_step):
            self.state, metrics = fn(self.state, prepared, self.extra)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(int(self.state.step), metrics)
        return metrics

    def evaluate(self, batches):  # noqa: D102 - RL stages are evaluated by specs_jax.evaluation
        raise ValueError("RL training has no loss evaluation; evaluate the policy with `specs-jax eval`")


def make_trainer(cfg: RunConfig, kind: str, processor: Any = None,
                 model: Qwen2_5_VLForConditionalGeneration | None = None, mesh: Mesh | None = None) -> Trainer:
    """The trainer of training kind ``kind``: :class:`RLTrainer` for algorithms that roll out (they need
    ``processor``), :class:`~specs_jax.training.trainer.Trainer` otherwise."""
    if get_algorithm(kind).data == "rl":
        if processor is None:
            raise ValueError(f"train {kind} rolls out: it needs a processor (data.source=files, data.processor "
                             "or model.path)")
        return RLTrainer(cfg, kind, processor, model, mesh)
    return Trainer(cfg, kind, model, mesh, processor)

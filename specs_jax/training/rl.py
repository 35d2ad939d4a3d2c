"""RL training kinds (``grpo``, ``opsd``, ``vigos``): one loop step = rollout -> rewards -> update(s).

Per loop step, for a prompt batch of :func:`specs_jax.data.pipeline.rl_batches` (``train.batch_size``
prompts; ``input_ids`` left-padded, ``answer``, images):

1. the sampler draws ``rl.group_size`` completions per prompt from the CURRENT weights (no copy:
   the trainer's sharded params are the sampler's inputs), seed ``hash(train.seed, step)``, so a
   resumed run samples exactly what an uninterrupted one does;
2. the SPECS reward (``R_format + R_acc``, :func:`specs_jax.rewards.score_batch`) scores them and
   :func:`~specs_jax.losses.group_advantages` turns rewards into advantages (``rl.scale_rewards``);
3. with ``rl.accuracy_filter = [lo, hi]`` (METHOD.md section 2, the online filter) the groups whose
   accuracy is outside ``[lo, hi]`` get an all-zero loss mask, so they add nothing to the loss or
   its token count (shapes stay static: no recompilation); when no group is left the update is
   skipped and only the step counter moves;
4. the algorithm (:class:`RLAlgorithm`) turns the rollout into its step batch, and
   ``rl.num_iterations`` optimizer updates run on it (the old log-probs are the sampler's).

``state.step`` counts optimizer updates; loop step ``k`` ends at update ``k * num_iterations``.
The algorithms: :class:`GRPO` here; ``opsd`` and ``vigos`` in :mod:`specs_jax.training.distill`.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from specs_jax.model import ModelConfig, Qwen2_5_VLForConditionalGeneration
from specs_jax.rewards import RewardBatch, score_batch
from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams
from specs_jax.training.batches import prepare_grpo
from specs_jax.training.config import RunConfig
from specs_jax.training.grpo import ScoredRollout, grpo_spec, rollout, rollout_sequences
from specs_jax.training.logging import check_finite
from specs_jax.training.state import join_params
from specs_jax.training.steps import LossSpec, batch_shardings
from specs_jax.training.trainer import RL_KINDS, Trainer

__all__ = ["GRPO", "RL_KINDS", "RLAlgorithm", "RLTrainer", "accuracy_filter_mask", "algorithm_class",
           "rollout_seed"]


class RLAlgorithm(Protocol):
    """What an RL training kind adds to the shared rollout loop (rollout -> rewards -> update)."""

    reference: bool  # the step gets a frozen copy of the starting parameters as ``extra``
    system_prompt: str | None  # system message of the prompts (None: ``data.system_prompt``)
    extra_forwards: int  # forward passes of the frozen model per update (reference or teachers), for MFU

    def spec(self) -> LossSpec: ...

    def sequences(self, prompts: dict, ro: ScoredRollout) -> dict: ...

    def prepare(self, seqs: dict, accum: int) -> Any: ...

    def shardings(self, prepared: Any, mesh: Mesh) -> Any: ...


class GRPO:
    """GRPO (METHOD.md section 4) with the options of :func:`~specs_jax.losses.grpo_loss` in ``loss.kwargs``
    (``eps_low``, ``eps_high``, ``kl_coef``, ``loss_agg``, ``dual_clip``, ...); ``kl_coef > 0`` brings the
    frozen reference model."""

    system_prompt = None

    def __init__(self, cfg: RunConfig, graphdef: nnx.GraphDef, model_cfg: ModelConfig, processor: Any):
        self.cfg, self.graphdef, self.model_cfg = cfg, graphdef, model_cfg
        self.loss_kwargs = dict(cfg.loss.kwargs)
        self.reference = self.loss_kwargs.get("kl_coef", 0.01) > 0
        self.extra_forwards = int(self.reference)

    def spec(self) -> LossSpec:
        return grpo_spec(self.graphdef, self.cfg.rl.temperature, **self.loss_kwargs)

    def sequences(self, prompts: dict, ro: ScoredRollout) -> dict:
        return rollout_sequences(self.model_cfg, prompts, ro, self.cfg.rl.group_size)

    def prepare(self, seqs: dict, accum: int) -> Any:
        return prepare_grpo(self.model_cfg, seqs, accum)

    def shardings(self, prepared: Any, mesh: Mesh) -> Any:
        return batch_shardings(prepared, mesh)


def algorithm_class(kind: str) -> type:
    """The :class:`RLAlgorithm` class of an RL training kind."""
    if kind == "grpo":
        return GRPO
    from specs_jax.training.distill import ALGORITHMS_DISTILL

    if kind not in ALGORITHMS_DISTILL:
        raise ValueError(f"RL training kind {kind!r}; expected one of {RL_KINDS}")
    return ALGORITHMS_DISTILL[kind]


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
    """Rollout metrics: reward mean/std, format rate, accuracy, lengths, kept share, group diversity."""
    lengths = ro.generation.mask.sum(1)
    flat = ro.rewards.reshape(-1, group_size)
    return {
        "reward/mean": float(ro.rewards.mean()), "reward/std": float(ro.rewards.std()),
        "reward/format_rate": float((scores.format > 0).mean()),
        "reward/accuracy": float((scores.accuracy > 0).mean()),
        "rollout/length_mean": float(lengths.mean()), "rollout/length_max": float(lengths.max()),
        "rollout/truncated": float((lengths == ro.generation.tokens.shape[1]).mean()),
        "rollout/groups_kept": float(keep.mean()),
        "rollout/groups_all_equal": float((flat.std(1) == 0).mean()),
    }


class RLTrainer(Trainer):
    """GRPO / OPSD / ViGOS training (module docstring). ``processor``: the
    :class:`~specs_jax.data.tokenizer.Processor` that decodes the completions (and builds teacher
    contexts); the prompt batches come tokenised by the same processor."""

    kinds = RL_KINDS

    def __init__(self, cfg: RunConfig, kind: str, processor: Any,
                 model: Qwen2_5_VLForConditionalGeneration | None = None, mesh: Mesh | None = None):
        self.processor = processor
        self.updates_per_step = cfg.rl.num_iterations
        if kind in RL_KINDS and cfg.loss.name != kind:
            raise ValueError(f"train {kind} uses the {kind!r} loss: set config key 'loss.name: {kind}' "
                             f"(got {cfg.loss.name!r})")
        self.algorithm_cls = algorithm_class(kind) if kind in RL_KINDS else None
        super().__init__(cfg, kind, model, mesh)

    def uses_reference(self) -> bool:
        return self.algorithm.reference

    def build_spec(self, model: Qwen2_5_VLForConditionalGeneration) -> LossSpec:
        rl = self.cfg.rl
        # the sampler needs the model's structure and config only: its weights come from the train state
        abstract = nnx.merge(self.graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                         nnx.state(model)))
        self.sampler = Sampler(abstract, self.processor, SamplerConfig(max_new_tokens=rl.max_new_tokens))
        self.sampling = SamplingParams(temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p)
        return self.algorithm.spec()

    @property
    def algorithm(self) -> RLAlgorithm:
        if "_algorithm" not in self.__dict__:
            self._algorithm = self.algorithm_cls(self.cfg, self.graphdef, self.model_cfg, self.processor)
        return self._algorithm

    def flops_factor(self) -> int:
        """Per token: the sampler's forward (2), each update's forward + backward (6) and forwards of the
        frozen reference or teachers (2 each; ViGOS runs three teachers)."""
        return 2 + self.updates_per_step * (6 + 2 * self.algorithm.extra_forwards)

    @property
    def system_prompt(self) -> str | None:
        """The system message the prompt batches must be tokenised with."""
        own = self.algorithm.system_prompt
        return self.cfg.data.system_prompt if own is None else own

    def place(self, prepared: Any) -> Any:
        """Put a host step batch on the mesh with the algorithm's shardings."""
        if jax.process_count() > 1:
            raise ValueError("multi-process RL training is not supported yet (every process would need the "
                             "whole rollout batch); run one process per host-sized job")
        return jax.device_put(prepared, self.algorithm.shardings(prepared, self.mesh))

    def train_step(self, prompts: dict[str, Any]) -> dict[str, float]:
        """One loop step on a prompt batch: rollout, scoring, ``rl.num_iterations`` updates."""
        cfg, rl = self.cfg, self.cfg.rl
        if len(prompts["input_ids"]) != cfg.train.batch_size:
            raise ValueError(f"prompt batch of {len(prompts['input_ids'])} rows, but train.batch_size="
                             f"{cfg.train.batch_size}")
        step = self.loop_step + 1
        t0 = time.perf_counter()
        scores: list[RewardBatch] = []

        def reward(gen, answers):
            scores.append(score_batch(gen.texts, answers))
            return scores[-1].total

        weights = join_params(self.state.params, self.state.frozen)
        ro = rollout(self.sampler, prompts, group_size=rl.group_size, params=self.sampling,
                     seed=rollout_seed(cfg.train.seed, step), weights=weights, reward_fn=reward,
                     scale=rl.scale_rewards)
        t1 = time.perf_counter()
        keep = accuracy_filter_mask(scores[0].accuracy > 0, rl.group_size, rl.accuracy_filter)
        seqs = self.algorithm.sequences(prompts, ro)
        seqs["loss_mask"] = np.where(keep[:, None], seqs["loss_mask"], 0)
        metrics = {**_scored(ro, scores[0], keep, rl.group_size), **self.update(seqs)}
        t2 = time.perf_counter()
        metrics.update({"time/rollout_s": t1 - t0, "time/update_s": t2 - t1})
        self.last_tokens = float(ro.generation.mask.sum() + ro.generation.prompt_mask.sum())
        self.last_rollout = ro
        return metrics

    def update(self, seqs: dict[str, Any]) -> dict[str, float]:
        """``rl.num_iterations`` optimizer updates on a host step batch (:meth:`RLAlgorithm.sequences`);
        the metrics of the last one. An all-zero ``loss_mask`` (every group filtered) skips the updates:
        only the step counter moves, the weights and the optimizer state stay."""
        if not np.asarray(seqs["loss_mask"]).any():
            self.state = self.state._replace(step=self.state.step + self.updates_per_step)
            return {}
        prepared = self.place(self.algorithm.prepare(seqs, self.cfg.optim.grad_accum_steps))
        fn = self._fns(prepared)[0]
        for _ in range(self.updates_per_step):
            self.state, metrics = fn(self.state, prepared, self.extra)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(int(self.state.step), metrics)
        return metrics

    def evaluate(self, batches):  # noqa: D102 - RL stages are evaluated by specs_jax.evaluation
        raise ValueError("RL training has no loss evaluation; evaluate the policy with `specs-jax eval`")

"""Training engine: configs, mesh/sharding, train state, jitted sharded steps, checkpoints, logging.

- :mod:`config` -- :class:`RunConfig` dataclasses; :func:`load_config` (YAML + ``key=value`` overrides).
- :mod:`sharding` -- ``data x fsdp x tensor`` mesh, logical-axis rules, parameter/batch shardings.
- :mod:`state` -- :class:`TrainState`, the optimizer (AdamW, clipping, schedules), frozen parameters.
- :mod:`batches` -- the data interface: numpy batch dicts -> micro-batched :class:`SeqBatch`.
- :mod:`steps` -- :func:`make_train_step` from a :class:`LossSpec` (the step machinery).
- :mod:`algorithm` -- the one interface and registry of training kinds (:class:`Algorithm`,
  :func:`register_algorithm`); the built-in kinds: :mod:`supervised` (``sft``, ``dpo``), :mod:`grpo`
  (``grpo`` and its loss variants), :mod:`distill` (``opsd``, ``vigos``).
- :mod:`checkpoint` -- Orbax checkpoints (state + data position), keep last N + best, HF export.
- :mod:`logging` -- JSONL/TensorBoard/W&B metrics, tokens/s, MFU, NaN/Inf guard.
- :mod:`trainer` -- :class:`Trainer`, the loop for fixed batches; :mod:`rl` -- :class:`RLTrainer`, the
  rollout loop, and :func:`make_trainer`, which picks one for a kind (used by ``specs-jax train``).
- :mod:`synthetic` -- random-token batches (tests and smoke runs).
"""

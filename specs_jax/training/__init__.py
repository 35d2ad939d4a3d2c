"""Training engine: configs, mesh/sharding, train state, jitted sharded steps, checkpoints, logging.

- :mod:`config` -- :class:`RunConfig` dataclasses; :func:`load_config` (YAML + ``key=value`` overrides).
- :mod:`sharding` -- ``data x fsdp x tensor`` mesh, logical-axis rules, parameter/batch shardings.
- :mod:`state` -- :class:`TrainState`, the optimizer (AdamW, clipping, schedules), frozen parameters.
- :mod:`batches` -- the data interface: numpy batch dicts -> micro-batched :class:`SeqBatch`.
- :mod:`steps` -- :func:`make_train_step` from a :class:`LossSpec` (``sft_spec``, ``dpo_spec``; the
  extension point for GRPO/OPSD/ViGOS steps).
- :mod:`checkpoint` -- Orbax checkpoints (state + data position), keep last N + best, HF export.
- :mod:`logging` -- JSONL/TensorBoard/W&B metrics, tokens/s, MFU, NaN/Inf guard.
- :mod:`trainer` -- :class:`Trainer`, the loop used by ``specs-jax train``.
- :mod:`synthetic` -- random-token batches (tests and smoke runs).
"""

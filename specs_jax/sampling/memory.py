"""Per-device memory of an RL rollout on the rollout layout (for ``scripts/plan_memory.py``): pure arithmetic on
the model config and the run's rollout settings, no arrays.

During the rollout a device holds (``G = devices / K`` data-parallel groups of ``K`` tensor-parallel devices,
:mod:`specs_jax.sampling.layout`; ``k = K`` when it divides the KV heads, else 1):

- the trainer's resident state (its params, frozen params, optimizer state, reference; from the update plan);
- the rollout copy of the weights: ``param_bytes / K``;
- the slot KV cache: ``ceil(slots / G) * (T + M) * kv_bytes_per_token / k`` (``T`` prompt bucket, ``M``
  max_new_tokens), slots from :func:`specs_jax.sampling.engine.choose_slots` with the run's ``rl.max_slots`` /
  ``rl.kv_cache_gib`` (default: half of what the device has left, as ``default_kv_cache_gib`` at run time);
- the prefill cache of all ``B`` prompts (the engine keeps it whole on every data group, so that a slot of any
  group can take any prompt's sample): ``B * T * kv_bytes_per_token / k``;
- the result buffers ``B * n * M`` tokens (int32 token, f32 log-prob, bool mask), replicated;
- the larger of the prefill's transients (one prompt at a time: f32 attention scores ``heads / K * T * T * 4``
  plus one layer's activations ``T * (2 * intermediate / K + 4 * hidden) * itemsize``) and the decode step's
  logits buffers (``4 * ceil(slots / G) * vocab * 4``: logits, scaled, filtered, log-softmax).
Not counted: the vision tower's activations for the batch's images (computed before the prefill).
"""

from __future__ import annotations

import math

import numpy as np

from specs_jax.model.config import ModelConfig
from specs_jax.sampling.engine import GIB, choose_slots, kv_bytes_per_token
from specs_jax.sampling.layout import parse_rollout_mesh, rollout_tensor_size


def rollout_memory(cfg: ModelConfig, *, prompts: int, group_size: int, prompt_len: int, max_new_tokens: int,
                   devices: int, host_devices: int, param_bytes: int, resident_bytes: int, budget_bytes: int,
                   rollout_mesh: str | int = "auto", max_slots: int | None = None,
                   kv_cache_gib: float | None = None) -> dict:
    """Per-device bytes of each part of the rollout (module docstring), the chosen layout and slot count, the total
    and whether it fits ``budget_bytes``."""
    choice = parse_rollout_mesh(rollout_mesh)
    if choice == "trainer":
        raise ValueError("rl.rollout_mesh=trainer decodes on the trainer's FSDP layout (weights gathered per step); "
                         "the rollout plan covers the rollout layouts (auto or K)")
    t = cfg.text
    tensor = choice if choice != "auto" else rollout_tensor_size(param_bytes, budget_bytes, devices, host_devices)
    if devices % tensor:
        raise ValueError(f"rl.rollout_mesh tensor size {tensor} does not divide the {devices} devices")
    groups = devices // tensor
    kv_split = tensor if t.num_key_value_heads % tensor == 0 else 1
    head_split = tensor if t.num_attention_heads % tensor == 0 else 1
    itemsize = np.dtype(cfg.dtype).itemsize
    per_token = kv_bytes_per_token(cfg)
    slot_len = prompt_len + max_new_tokens
    samples = prompts * group_size

    parts = {
        "resident_train_state": resident_bytes,
        "rollout_weights": param_bytes // tensor,
        "prefill_cache": prompts * prompt_len * per_token // kv_split,
        "outputs": samples * max_new_tokens * (4 + 4 + 1),
    }
    prefill = ((t.num_attention_heads // head_split) * prompt_len**2 * 4
               + prompt_len * (2 * t.intermediate_size // tensor + 4 * t.hidden_size) * itemsize)

    def logits(slots: int) -> int:
        return 4 * math.ceil(slots / groups) * t.vocab_size * 4

    if kv_cache_gib is None and max_slots is None:  # half of what is left, as at run time
        free = budget_bytes - sum(parts.values()) - max(prefill, logits(samples))
        kv_cache_gib = max(free, 0) / 2 * kv_split / GIB
    budget_total = None if kv_cache_gib is None else kv_cache_gib * groups
    slots = choose_slots(cfg, samples, slot_len, max_slots=max_slots, kv_cache_gib=budget_total, multiple=groups)
    parts["kv_cache"] = math.ceil(slots / groups) * slot_len * per_token // kv_split
    parts["transients"] = max(prefill, logits(slots))
    total = sum(parts.values())
    return {
        "rollout_mesh": {"data": groups, "fsdp": 1, "tensor": tensor}, "slots": slots,
        "slots_per_group": math.ceil(slots / groups), "samples": samples, "slot_tokens": slot_len,
        "kv_bytes_per_token": per_token, "kv_cache_gib_per_device": kv_cache_gib,
        **{f"{k}_bytes": v for k, v in parts.items()},
        "total_bytes": total, "total_gib": total / GIB, "fits": total <= budget_bytes,
        "headroom_gib": (budget_bytes - total) / GIB,
    }

"""Per-device memory of an RL rollout on the rollout layout (for ``scripts/plan_memory.py``), two ways:
:func:`rollout_memory`, arithmetic on the model config and the run's rollout settings (the breakdown, and the slot
count), and :func:`rollout_program_memory`, XLA's memory analysis of the engine's rollout program compiled for
abstract inputs of those shapes on the rollout mesh (the figure to trust: it holds every buffer XLA allocates).

During the rollout a device holds (``G = devices / K`` data-parallel groups of ``K`` tensor-parallel devices,
:mod:`specs_jax.sampling.layout`; ``k = K`` when it divides the KV heads, else 1):

- the trainer's resident state (its params, frozen params, optimizer state, reference; from the update plan);
- the rollout copy of the weights: ``param_bytes / K``;
- the slot KV cache: ``ceil(slots / G) * (T + M) * kv_bytes_per_token / k`` (``T`` prompt bucket, ``M``
  max_new_tokens), slots from :func:`specs_jax.sampling.engine.choose_slots` with the run's ``rl.max_slots`` /
  ``rl.kv_cache_gib`` (default: half of what the device has left, as ``default_kv_cache_gib`` at run time);
- the prefill cache of the group's prompts (each data group prefills and decodes its own ``B / G`` prompts; all
  ``B`` when ``G`` does not divide them): ``B / G * T * kv_bytes_per_token / k``;
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
from specs_jax.sampling.engine import GIB, choose_slots, engine_rollout, kv_bytes_per_token
from specs_jax.sampling.layout import parse_rollout_mesh, rollout_shardings, rollout_tensor_size
from specs_jax.sampling.sample import SamplingParams


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
        "prefill_cache": (prompts // groups if prompts % groups == 0 else prompts) * prompt_len * per_token // kv_split,
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


def rollout_program_memory(cfg: ModelConfig, mesh, *, prompts: int, group_size: int, prompt_len: int,
                           max_new_tokens: int, slots: int, image_patches: int = 0, rules: dict | None = None) -> dict:
    """XLA's per-device memory of the engine's rollout program (:func:`specs_jax.sampling.engine.engine_rollout`,
    as the sampler jits it) for ``prompts`` prompts of ``prompt_len`` tokens (each with ``image_patches`` patches of
    images, 0: text only), ``group_size`` samples each, ``slots`` decode slots, on ``mesh`` (the rollout layout:
    the weights in the compute dtype with :func:`~specs_jax.sampling.layout.rollout_shardings`, the prompts
    replicated). Compiled for abstract arrays, never run. Returns bytes of arguments, outputs, temporaries and
    their peak ``argument + output - alias + temp``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from specs_jax.model.qwen2_5_vl import ModelInputs, Qwen2_5_VLForConditionalGeneration, VisionInputs
    from specs_jax.training.sharding import make_rules

    model = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(model)
    weights = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(cfg.dtype), sharding=s),
                           nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                           rollout_shardings(model, mesh, make_rules(rules)))
    rep = NamedSharding(mesh, PartitionSpec())
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    b, t, p = prompts, prompt_len, image_patches
    vision = None
    if p:
        merge2 = cfg.vision.spatial_merge_size**2
        i32 = jnp.int32
        vision = VisionInputs(sds((b, p, cfg.vision.patch_dim), jnp.float32), sds((b, p), i32), sds((b, p, 2), i32),
                              sds((b, p), i32), sds((b, p), i32), sds((b, p // merge2), i32))
    inputs = ModelInputs(sds((b, t), jnp.int32), sds((3, b, t), jnp.int32), sds((b, t), jnp.bool_), vision)
    key = jax.eval_shape(lambda: jax.random.key(0))
    samples = b * group_size

    def run(state, inputs, key, limits):
        return engine_rollout(nnx.merge(graphdef, nnx.State(state)), inputs, key, samples=jnp.int32(samples),
                              limits=limits, n=group_size, slots=slots, max_new_tokens=max_new_tokens,
                              params=SamplingParams(), eos_ids=(0,), pad_id=0)

    with jax.set_mesh(mesh):
        compiled = jax.jit(run).lower(weights, inputs, key, sds((samples,), jnp.int32)).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("this jax backend gives no memory_analysis() of compiled programs")
    out = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def fit_slots(cfg: ModelConfig, mesh, *, most: int, budget_bytes: int, resident_bytes: int,
              **shape) -> tuple[int, dict]:
    """The most decode slots, a multiple of the mesh's data groups and at most ``most``, whose compiled rollout
    program (:func:`rollout_program_memory` with ``shape``) fits ``budget_bytes`` beside ``resident_bytes``
    (bisection over the slots per group), and that program's memory. ``most`` itself when even one slot per group
    does not fit (the caller reports that it does not fit)."""
    groups = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    memo: dict[int, dict] = {}

    def program(per_group: int) -> dict:
        if per_group not in memo:
            memo[per_group] = rollout_program_memory(cfg, mesh, slots=per_group * groups, **shape)
        return memo[per_group]

    fits = lambda per_group: program(per_group)["peak_bytes"] + resident_bytes <= budget_bytes
    hi = max(most // groups, 1)
    if fits(hi) or not fits(1):
        return hi * groups if most >= groups else most, program(hi)
    lo = 1  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * groups, program(lo)

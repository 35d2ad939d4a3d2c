#!/usr/bin/env python
"""Plan the per-device memory of a training step before renting the hardware.

Builds the train step of a model preset exactly as the trainer does (same optimizer, same
parameter/optimizer/batch shardings, same loss spec), but with abstract inputs only
(``jax.ShapeDtypeStruct``: no weight is ever allocated), lowers and compiles it ahead of time
for a mesh of N fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set
here before jax is imported), and prints the per-device memory of the compiled program
(``compiled.memory_analysis()``) against a per-device budget:

    python scripts/plan_memory.py qwen2.5-vl-7b --mesh data=1,fsdp=16,tensor=1 --stage grpo
    python scripts/plan_memory.py qwen2.5-vl-72b --mesh data=1,fsdp=16,tensor=4 --stage grpo
    python scripts/plan_memory.py tiny --mesh data=2,fsdp=2,tensor=2 --stage dpo --seq-len 64 --json
    # the paper's RL sequences (4096-token prompt bucket + 10240 response tokens), per attention backend:
    python scripts/plan_memory.py qwen2.5-vl-7b --mesh data=1,fsdp=16,tensor=1 --stage grpo --seq-len 14336 \
        --attention splash --json

Attention (``--attention``, the run config's ``model.attention``): ``xla`` is the dense-mask
reference, whose backward holds ``[rows, heads, T, T]`` fp32 scores/probabilities of a layer (at
T = 14336 and 28 heads: ~23 GB per row and array); ``blockwise`` (default) is the pure-JAX flash
attention, O(T); ``splash`` is the Pallas TPU kernel. These fake devices are CPU devices, which
cannot compile the TPU (Mosaic) kernel: splash is compiled in Pallas *interpret mode* (the kernel's
grid as an XLA loop over the same blocks), so its figures stand in for the TPU kernel's, like the
blockwise ones do (both keep O(T) per layer; the script says so in its output).

What is counted (per device; one device of the mesh, all devices hold the same amount):

- params: the trained parameters (``--param-dtype``, default float32 master weights) and the
  frozen ones (``--freeze-vision``), each shard as ``state_shardings`` places it;
- optimizer state: AdamW's two moments (param dtype) and its step counter;
- reference: for ``dpo`` and for ``grpo`` with ``--kl-coef > 0``, the frozen reference copy of
  all parameters that the trainer passes as the step's ``extra`` (same shardings as the params);
- batch: the stacked micro-batches ``[grad_accum, rows, seq_len]`` (token ids, M-RoPE positions,
  masks, labels; GRPO's old log-probs and advantages; with ``--image-patches``, every row's image
  patch budget, sharded with the rows);
- arguments / outputs / alias: XLA's sizes of the step's inputs and outputs; the train state is
  donated, so its outputs alias its inputs and are counted once;
- temp: everything the program allocates itself: activations kept for the backward pass (with
  ``--remat full`` only the layer inputs), the gradient accumulator, the optimizer update,
  vocabulary-chunked log-softmax buffers and XLA scratch space;
- program peak = arguments + outputs - alias + temp (XLA's figures for the compiled step);
- held inputs the program never reads: ``jax.jit`` drops arguments the step does not use (e.g. the
  reference's vision tower in a text-only DPO step), but the trainer still keeps them on the device;
- total = program peak + those, compared with ``--budget-gib``.

Caveats: the figures come from the XLA CPU compiler. Sharding propagation and SPMD partitioning
are the same passes as on GPU/TPU, but those compilers fuse, schedule and pad differently, and the
CPU backend runs many bf16 matmuls in f32 (visible in ``--hlo-out``), so treat the result as an
estimate with a margin of ~10-20%, not a guarantee. Not included: the framework's own reserve
(e.g. ``XLA_PYTHON_CLIENT_MEM_FRACTION`` on GPU). The layers are scanned, so even the
72B preset compiles in seconds, in well under 1 GiB of host RAM (nothing of the model is allocated).

Reading the result: params + optimizer state should be about 16 bytes x params / (fsdp x tensor)
(fp32 master weights and moments); temp holds the rest. When temp is far larger than the
activations of the rows a device holds, look at the collectives in ``--hlo-out``: all-reduces of
full-batch activations mean XLA partitioned a matmul along the hidden dimension (like the fsdp-
sharded weights) instead of along the batch, so every device computes every row.

The rollout (``--stage grpo``; the same rollout serves opsd and vigos): the RL step's other program,
planned from the run config's rollout settings (``--config``: ``train.batch_size`` prompts x ``rl.group_size``
samples, prompt bucket ``train.max_length``, ``rl.max_new_tokens``, ``rl.max_slots`` / ``rl.kv_cache_gib``,
``rl.rollout_mesh``). :func:`specs_jax.sampling.memory.rollout_memory` chooses the layout and the decode slots and
breaks the memory down by arithmetic (the trainer's state that stays resident, the rollout copy of the weights,
the slot KV cache, the prefill cache, the result buffers, the larger of the prefill and decode transients);
then the engine's rollout program itself is compiled on the rollout mesh with those slots
(:func:`specs_jax.sampling.memory.rollout_program_memory`, with ``--image-patches`` per prompt) and the
rollout's ``total_gib`` is its compiled peak plus the resident train state. ``--config`` also sets the
update's batch from the run config (``batch_size x group_size / grad_accum_steps`` rows of ``max_length +
max_new_tokens`` tokens, ``grad_accum_steps`` micro-batches, dtypes, remat, freeze_vision) unless the flags are
given. ``--json`` then prints ``{...update plan..., "update": {...}, "rollout": {...}}``, each entry with
``total_gib``, and ``fits`` is true only when both fit:

    python scripts/plan_memory.py qwen2.5-vl-7b --mesh data=1,fsdp=16,tensor=1 --stage grpo \
        --config configs/grpo_7b.yaml --json

Exit status: 0 when the plan fits the budget, 3 when it does not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MESH_AXES = ("data", "fsdp", "tensor")  # = specs_jax.training.sharding.MESH_AXES (not imported: jax must wait)
STAGES = ("sft", "dpo", "grpo")
ATTENTION_CHOICES = ("xla", "blockwise", "splash")  # backends that compile for CPU devices (cudnn needs a GPU)
ATTENTION_NOTES = {
    "xla": "dense-mask reference: the backward of each layer holds [rows, heads, T, T] fp32 scores and "
           "probabilities (O(T^2))",
    "blockwise": "pure-JAX flash attention (online softmax over blocks, recomputing backward): O(T); it also "
                 "stands in for the O(T) TPU/GPU kernels (splash, cuDNN) that these CPU devices cannot compile",
    "splash": "Pallas TPU splash attention compiled in Pallas INTERPRET mode on these CPU devices (the Mosaic TPU "
              "kernel cannot compile for CPU): the figures are those of the interpreted kernel (same blocks, "
              "O(T)), a stand-in for the TPU kernel's",
}
GIB = 1024**3
EXIT_DOES_NOT_FIT = 3


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=1,fsdp=16,tensor=1"`` -> ``{"data": 1, "fsdp": 16, "tensor": 1}`` (missing axes: 1).

    ``ValueError`` naming the offending part for an unknown axis, a repeated axis, a size that is not
    a positive integer or a part that is not ``axis=size``."""
    sizes: dict[str, int] = {}
    parts = [p.strip() for p in text.split(",")]
    for part in parts:
        if not part:
            raise ValueError(f"empty part in mesh {text!r}; expected e.g. data=1,fsdp=16,tensor=1")
        m = re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*(\S+)", part)
        if not m:
            raise ValueError(f"mesh part {part!r} is not AXIS=SIZE (axes: {', '.join(MESH_AXES)})")
        axis, value = m.groups()
        if axis not in MESH_AXES:
            raise ValueError(f"mesh part {part!r}: unknown mesh axis {axis!r}; known axes: {', '.join(MESH_AXES)}")
        if axis in sizes:
            raise ValueError(f"mesh part {part!r}: axis {axis!r} given twice")
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise ValueError(f"mesh part {part!r}: size {value!r} must be a positive integer")
        sizes[axis] = int(value)
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plan_memory.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="model preset, a models/NAME.json (tiny, qwen2.5-vl-3b, qwen2.5-vl-7b, "
                                  "qwen2.5-vl-32b, qwen2.5-vl-72b; see specs_jax.model.list_presets())")
    p.add_argument("--mesh", default="data=1,fsdp=1,tensor=1",
                   help="device mesh AXIS=SIZE,... over the axes data (pure data parallel), fsdp (data parallel "
                        "with params/optimizer sharded, ZeRO-3), tensor (Megatron tensor parallel); a missing axis "
                        "is 1; the product is the number of fake CPU devices (default: %(default)s)")
    p.add_argument("--stage", choices=STAGES, default="sft",
                   help="which step: sft (token-mean NLL), dpo (dpo_hybrid loss with the frozen reference "
                        "params as extra input, computed per batch as model.reference=batch does), grpo (GRPO "
                        "loss; rows carry old log-probs [R,T] and advantages [R]) (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=4096,
                   help="tokens per row, T, e.g. 14336 = the paper's 4096-token prompt bucket + 10240 response "
                        "tokens; up to 16384 with an O(T) --attention (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None,
                   help="global rows (sequences) per micro-batch, summed over the data x fsdp devices; for dpo "
                        "the chosen plus the rejected rows (so 2 x pairs). Must be divisible by data*fsdp. "
                        "Default: data*fsdp (one row per data-parallel device; doubled for dpo if odd)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation under lax.scan; the whole "
                        "stacked batch [grad_accum, batch, T] is a step input) (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="compute dtype of activations and matmuls (default: %(default)s)")
    p.add_argument("--param-dtype", default="float32", choices=("bfloat16", "float32", "float16"),
                   help="storage dtype of the parameters and of AdamW's moments (default: %(default)s)")
    p.add_argument("--remat", default="full", choices=("full", "dots", "none"),
                   help="rematerialisation of the scanned layers: full (keep only layer inputs), dots (also "
                        "keep matmul outputs), none (keep everything) (default: %(default)s)")
    p.add_argument("--mlp-tile", type=int, default=0,
                   help="model.mlp_tile: the decoder MLP over tiles of this many positions, each rematerialised "
                        "(its [rows, T, intermediate] activations for one tile at a time); 0 = off "
                        "(default: %(default)s)")
    p.add_argument("--attention", default="blockwise", choices=ATTENTION_CHOICES,
                   help="attention backend (model.attention): xla (the dense-mask reference: materialises "
                        "[rows, heads, T, T] scores per layer), blockwise (pure-JAX flash attention, O(T) memory), "
                        "splash (the Pallas TPU kernel; on these fake CPU devices it compiles in Pallas interpret "
                        "mode, see the caveats) (default: %(default)s)")
    p.add_argument("--freeze-vision", action="store_true",
                   help="the vision tower is frozen (no gradient, no optimizer state), as model.freeze_vision")
    p.add_argument("--image-patches", type=int, default=0,
                   help="vision patches per row (a 448x448 image has 1024 patches, 256 image tokens); 0 = text "
                        "only, no vision inputs. Must be a multiple of spatial_merge_size**2 (4); the image "
                        "tokens (patches/4) must fit in --seq-len (default: %(default)s)")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="grpo only: KL coefficient; > 0 adds the frozen reference params as an input and a "
                        "reference forward per micro-batch (default %(default)s: SPECS uses no KL, METHOD.md)")
    p.add_argument("--budget-gib", type=float, default=95.0,
                   help="per-device memory budget in GiB for the FITS / DOES NOT FIT line (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print the plan as one JSON object (bytes and GiB) instead of the table")
    add_rollout_arguments(p)
    p.add_argument("--hlo-out", metavar="FILE", default=None,
                   help="also write the compiled (partitioned, per-device) HLO text to FILE, e.g. to see which "
                        "collectives and buffer shapes XLA chose")
    return p


def set_device_count(n: int) -> None:
    """Make the CPU backend expose ``n`` devices (must run before jax is imported). Also skips LLVM's
    optimisation of the generated CPU code (``--xla_backend_optimization_level=0``,
    ``--xla_llvm_disable_expensive_passes=true``) unless ``XLA_FLAGS`` sets them: the program is never
    run, and the HLO passes and buffer assignment that the memory figures come from do not depend on
    it (same figures, about half the compile time)."""
    if "jax" in sys.modules:
        raise RuntimeError("plan_memory: jax was imported before the device count could be set")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    if "--xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0"
    if "--xla_llvm_disable_expensive_passes" not in flags:
        flags += " --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # the fake devices are CPU devices, even on a GPU/TPU host


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        mesh_sizes = parse_mesh(args.mesh)
    except ValueError as e:
        parser.error(f"--mesh: {e}")
    if args.config:  # loading it imports jax: the device count first
        set_device_count(math.prod(mesh_sizes.values()))
        try:
            parser.set_defaults(**config_defaults(args.config))
        except (OSError, ValueError) as e:
            parser.error(f"--config: {e}")
        args = parser.parse_args(argv)
    n_dp = mesh_sizes["data"] * mesh_sizes["fsdp"]
    if args.batch is None:
        args.batch = n_dp * (2 if args.stage == "dpo" and n_dp % 2 else 1)
    for name in ("seq_len", "batch", "grad_accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch % n_dp:
        parser.error(f"--batch {args.batch} is not divisible by data*fsdp = {n_dp}")
    if args.stage == "dpo" and args.batch % 2:
        parser.error(f"--batch {args.batch}: a dpo micro-batch holds chosen and rejected rows, so it must be even")
    if args.kl_coef and args.stage != "grpo":
        parser.error("--kl-coef is for --stage grpo")
    if args.image_patches < 0 or args.image_patches % 4:
        parser.error(f"--image-patches {args.image_patches} must be a non-negative multiple of 4")
    if args.image_patches // 4 >= args.seq_len:
        parser.error(f"--image-patches {args.image_patches} gives {args.image_patches // 4} image tokens per row, "
                     f"more than --seq-len {args.seq_len} can hold")

    if not args.config:
        set_device_count(math.prod(mesh_sizes.values()))
    try:
        plan = make_plan(args, mesh_sizes)
        if args.stage == "grpo":
            plan = with_rollout_plan(plan, args)
    except ValueError as e:  # e.g. an unknown preset (ConfigError), a batch the library refuses
        parser.error(str(e))
    if args.json:
        print(json.dumps(plan, sort_keys=False))
    else:
        print_plan(plan)
        if "rollout" in plan:
            print_rollout_plan(plan["rollout"], args.budget_gib)
    return 0 if plan["fits"] else EXIT_DOES_NOT_FIT


# ------------------------------------------------------------------------------------------------
# everything below runs after jax is imported (device count set)
# ------------------------------------------------------------------------------------------------

def small_batch(cfg, stage: str, with_images: bool):
    """A real prepared micro-batch stack of 2 rows x 16 tokens (1 micro-batch): the layout (tree structure
    and dtypes) the library's batch preparation produces for this stage."""
    import numpy as np

    from specs_jax.training.batches import prepare_dpo, prepare_grpo, prepare_sft

    rows, t = 2, 16
    ids = np.full((rows, t), 7, np.int64)
    batch = {"input_ids": ids, "attention_mask": np.ones((rows, t), np.int32),
             "loss_mask": np.concatenate([np.zeros((rows, t // 2), np.int32), np.ones((rows, t // 2), np.int32)], 1)}
    if with_images:
        merge = cfg.vision.spatial_merge_size
        ids[:, 2] = cfg.image_token_id  # one image of grid (1, merge, merge) = 1 image token per row
        batch["pixel_values"] = np.zeros((rows * merge * merge, cfg.vision.patch_dim), np.float32)
        batch["image_grid_thw"] = np.array([[1, merge, merge]] * rows)
    if stage == "grpo":
        batch["old_logps"] = np.zeros((rows, t), np.float32)
        batch["advantages"] = np.zeros((rows,), np.float32)
    return {"sft": prepare_sft, "dpo": prepare_dpo, "grpo": prepare_grpo}[stage](cfg, batch, 1)


def abstract_batch(cfg, args):
    """``SeqBatch`` of ``ShapeDtypeStruct`` ``[grad_accum, batch, seq_len, ...]`` for this stage, with the
    dtypes of :func:`small_batch` (the structure is checked against it)."""
    import jax

    from specs_jax.model import ModelInputs, VisionInputs
    from specs_jax.training.batches import SeqBatch

    a, b, t = args.grad_accum, args.batch, args.seq_len
    vision = None
    if args.image_patches:
        n = args.image_patches  # every row's own image patch budget (VisionInputs is per row)
        merge2 = cfg.vision.spatial_merge_size**2
        vision = VisionInputs(pixel_values=(a, b, n, cfg.vision.patch_dim), permutation=(a, b, n),
                              pos_hw=(a, b, n, 2), window_segment=(a, b, n), image_segment=(a, b, n),
                              unpermute=(a, b, n // merge2))
    rows = {"old_logps": (a, b, t), "advantages": (a, b)} if args.stage == "grpo" else None
    shapes = SeqBatch(inputs=ModelInputs(input_ids=(a, b, t), positions=(a, 3, b, t), attention_mask=(a, b, t),
                                         vision=vision),
                      labels=(a, b, t), mask=(a, b, t), ref_logps=None, rows=rows)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
    real = small_batch(cfg, args.stage, bool(args.image_patches))
    if jax.tree.structure(shapes, is_leaf=is_shape) != jax.tree.structure(real):
        raise RuntimeError("plan_memory.py is out of date with specs_jax.training.batches: the prepared batch is\n"
                           f"  {jax.tree.structure(real)}\nbut the plan builds\n"
                           f"  {jax.tree.structure(shapes, is_leaf=is_shape)}")

    def sds(shape, like):
        if len(shape) != like.ndim:
            raise RuntimeError(f"plan_memory.py: batch leaf of shape {like.shape} planned as {shape}")
        return jax.ShapeDtypeStruct(shape, like.dtype)

    return jax.tree.map(sds, shapes, real, is_leaf=is_shape)


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs placed with ``shardings`` (the largest
    device's share; all are equal for even shardings)."""
    import jax
    import numpy as np

    def one(x, s) -> int:
        return int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def make_plan(args, mesh_sizes: dict[str, int]) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from specs_jax.model import Qwen2_5_VLForConditionalGeneration, load_preset
    from specs_jax.training.algorithm import get_algorithm
    from specs_jax.training.config import OptimConfig, RunConfig
    from specs_jax.training.sharding import make_mesh, make_rules
    from specs_jax.training.state import (
        TrainState,
        join_params,
        lr_schedule,
        make_optimizer,
        split_frozen,
        state_shardings,
    )
    from specs_jax.training.steps import batch_shardings, make_train_step

    t0 = time.perf_counter()
    cfg = load_preset(args.preset, dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                      attention=args.attention, mlp_tile=args.mlp_tile)
    if args.image_patches and args.image_patches % cfg.vision.spatial_merge_size**2:
        raise SystemExit(f"--image-patches must be a multiple of spatial_merge_size**2 = "
                         f"{cfg.vision.spatial_merge_size**2}")
    model = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(model)
    mesh = make_mesh(**mesh_sizes)
    optim = OptimConfig(grad_accum_steps=args.grad_accum)
    total_steps = 1000  # shapes the LR schedule only; no effect on memory
    tx = make_optimizer(optim, total_steps)
    schedule = lr_schedule(optim, total_steps)
    shardings = state_shardings(model, tx, args.freeze_vision, mesh, make_rules())

    params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                          nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    trained, frozen = split_frozen(params, args.freeze_vision)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=trained, frozen=frozen,
                          opt_state=jax.eval_shape(tx.init, trained),
                          rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)

    batch = abstract_batch(cfg, args)
    batch_sh = batch_shardings(batch, mesh)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, batch_sh)

    run_cfg = RunConfig()
    if args.stage == "grpo":
        run_cfg.loss.kwargs = {"kl_coef": args.kl_coef}
    algorithm = get_algorithm(args.stage)(run_cfg, graphdef, cfg)
    extra = extra_sh = None
    if algorithm.reference:
        extra_sh = join_params(shardings.params, shardings.frozen)
        extra = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             join_params(trained, frozen), extra_sh)
    spec = algorithm.spec()
    step = make_train_step(graphdef, spec, tx, schedule, shardings, batch_sh, extra_sh)
    t_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    lowered = step.lower(state, batch, extra)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    if args.hlo_out:
        Path(args.hlo_out).write_text(compiled.as_text())
    mem = compiled.memory_analysis()
    if mem is None:
        raise SystemExit("plan_memory: this jax backend gives no memory_analysis() of compiled programs")

    n_params = sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(params))
    n_trained = sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(trained))
    parts = {
        "params": shard_bytes(trained, shardings.params),
        "frozen_params": shard_bytes(frozen, shardings.frozen),
        "optimizer_state": shard_bytes(abstract.opt_state, shardings.opt_state),
        "reference_params": shard_bytes(extra, extra_sh) if algorithm.reference else 0,
        "batch": shard_bytes(batch, batch_sh),
    }
    inputs = shard_bytes(state, shardings) + parts["batch"] + parts["reference_params"]
    argument = int(mem.argument_size_in_bytes)
    output = int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    code = int(mem.generated_code_size_in_bytes)
    peak = argument + output - alias + temp
    unread = max(0, inputs - argument)  # jit prunes inputs it never reads; the trainer still holds them
    total = peak + unread
    budget = int(args.budget_gib * GIB)
    tokens = args.grad_accum * args.batch * args.seq_len
    return {
        "preset": args.preset, "stage": args.stage, "mesh": mesh_sizes, "devices": math.prod(mesh_sizes.values()),
        "seq_len": args.seq_len, "batch": args.batch, "grad_accum": args.grad_accum,
        "rows_per_device": args.batch // (mesh_sizes["data"] * mesh_sizes["fsdp"]),
        "tokens_per_step": tokens, "dtype": args.dtype, "param_dtype": args.param_dtype, "remat": args.remat,
        "mlp_tile": args.mlp_tile, "freeze_vision": args.freeze_vision, "image_patches": args.image_patches,
        "kl_coef": args.kl_coef,
        "attention": args.attention, "attention_note": ATTENTION_NOTES[args.attention],
        "param_count": n_params, "trained_param_count": n_trained,
        **{f"{k}_bytes": v for k, v in parts.items()},
        "argument_bytes": argument, "output_bytes": output, "alias_bytes": alias, "temp_bytes": temp,
        "generated_code_bytes": code, "peak_bytes": peak, "unread_input_bytes": unread, "total_bytes": total,
        "total_gib": total / GIB, "budget_gib": args.budget_gib, "fits": total <= budget,
        "headroom_gib": (budget - total) / GIB,
        "build_seconds": round(t_build, 2), "lower_seconds": round(t_lower, 2),
        "compile_seconds": round(t_compile, 2), "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }


def print_plan(p: dict) -> None:
    def g(n: int) -> str:
        if n >= GIB // 10 or n == 0:
            return f"{n / GIB:10.2f} GiB"
        return f"{n / 1024**2:10.2f} MiB" if n >= 1024**2 // 10 else f"{n / 1024:10.2f} KiB"

    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items())
    extras = [f"remat={p['remat']}", f"dtype={p['dtype']}", f"param_dtype={p['param_dtype']}"]
    if p["mlp_tile"]:
        extras.append(f"mlp_tile={p['mlp_tile']}")
    if p["freeze_vision"]:
        extras.append("vision frozen")
    if p["image_patches"]:
        extras.append(f"{p['image_patches']} image patches/row")
    if p["stage"] == "grpo":
        extras.append(f"kl_coef={p['kl_coef']:g}")
    print(f"{p['preset']}  stage={p['stage']}  mesh {mesh} ({p['devices']} devices)")
    print(f"  {p['param_count'] / 1e9:.3f} B params ({p['trained_param_count'] / 1e9:.3f} B trained); "
          f"micro-batch {p['batch']} rows x {p['seq_len']} tokens ({p['rows_per_device']} row(s) per data x fsdp "
          f"shard) x {p['grad_accum']} micro-batch(es) = {p['tokens_per_step']} tokens/step")
    print(f"  {', '.join(extras)}")
    print(f"  attention={p['attention']}: {p['attention_note']}")
    print(f"  build {p['build_seconds']:.1f} s, lower {p['lower_seconds']:.1f} s, "
          f"compile {p['compile_seconds']:.1f} s (XLA {p['backend']}, jax {p['jax_version']})")
    print("per device:")
    rows = [("params (trained)", p["params_bytes"])]
    if p["frozen_params_bytes"]:
        rows.append(("params (frozen)", p["frozen_params_bytes"]))
    rows.append(("optimizer state", p["optimizer_state_bytes"]))
    if p["reference_params_bytes"]:
        rows.append(("reference params", p["reference_params_bytes"]))
    rows += [("batch", p["batch_bytes"]),
             ("= arguments (XLA)", p["argument_bytes"]),
             ("+ outputs", p["output_bytes"]),
             ("- aliased (donated state)", p["alias_bytes"]),
             ("+ temp (activations, grads, scratch)", p["temp_bytes"]),
             ("= program peak", p["peak_bytes"])]
    if p["unread_input_bytes"]:
        rows.append(("+ held inputs the program never reads", p["unread_input_bytes"]))
    rows.append(("= total per device", p["total_bytes"]))
    for name, n in rows:
        print(f"  {name:<38}{g(n)}")
    if p["generated_code_bytes"]:
        print(f"  {'(generated code)':<38}{g(p['generated_code_bytes'])}")
    fits = p["total_bytes"] <= p["budget_gib"] * GIB  # this program's verdict (``p["fits"]`` also holds the rollout's)
    verdict = "FITS" if fits else "DOES NOT FIT"
    sign = "headroom" if fits else "over by"
    print(f"{verdict}: {p['total_gib']:.2f} GiB of the {p['budget_gib']:g} GiB budget per device "
          f"({sign} {abs(p['headroom_gib']):.2f} GiB)")


# ------------------------------------------------------------------------------------------------
# the rollout program of the RL stages
# ------------------------------------------------------------------------------------------------

def add_rollout_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", default=None,
                   help="run config (e.g. configs/grpo_7b.yaml): rollout settings for the rollout plan of --stage "
                        "grpo, and the update's batch, dtypes and remat unless given as flags")
    p.add_argument("--host-devices", type=int, default=4,
                   help="devices per host: the rollout's tensor parallelism stays within a host "
                        "(rl.rollout_mesh=auto) (default: %(default)s)")


def config_defaults(path: str) -> dict:
    """Parser defaults from a run config: the update's rows, tokens, micro-batches, dtypes and remat, and the
    config itself for the rollout plan."""
    from specs_jax.training.config import load_config

    cfg = load_config(path, ["data.source=synthetic"])  # the data files are not needed to plan
    accum = cfg.optim.grad_accum_steps
    rows = cfg.train.batch_size * cfg.rl.group_size
    if rows % accum:
        raise ValueError(f"{rows} rollout rows are not divisible by optim.grad_accum_steps={accum}")
    return {"batch": rows // accum, "grad_accum": accum, "seq_len": cfg.train.max_length + cfg.rl.max_new_tokens,
            "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype, "remat": cfg.model.remat,
            "mlp_tile": cfg.model.mlp_tile, "freeze_vision": cfg.model.freeze_vision, "run_config": cfg}


def with_rollout_plan(plan: dict, args) -> dict:
    """The update plan with its ``update`` summary, the ``rollout`` plan, and ``fits`` for both."""
    import jax
    from flax import nnx

    from specs_jax.model import Qwen2_5_VLForConditionalGeneration, load_preset
    from specs_jax.sampling.layout import param_bytes as rollout_param_bytes
    from specs_jax.sampling.layout import rollout_mesh
    from specs_jax.sampling.memory import fit_slots, rollout_memory
    from specs_jax.training.config import RunConfig

    run = getattr(args, "run_config", None) or RunConfig()
    cfg = load_preset(args.preset, dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                      attention=args.attention, mlp_tile=args.mlp_tile)
    model = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    param_bytes = rollout_param_bytes(nnx.state(model, nnx.Param), cfg.dtype)  # the copy in the compute dtype
    resident = sum(plan[f"{k}_bytes"] for k in ("params", "frozen_params", "optimizer_state", "reference_params"))
    budget = int(args.budget_gib * GIB)
    shape = dict(prompts=run.train.batch_size, group_size=run.rl.group_size, prompt_len=run.train.max_length,
                 max_new_tokens=run.rl.max_new_tokens)
    plan_args = dict(devices=plan["devices"], host_devices=args.host_devices, param_bytes=param_bytes,
                     resident_bytes=resident, budget_bytes=budget)
    rollout = rollout_memory(cfg, **shape, **plan_args, rollout_mesh=run.rl.rollout_mesh, max_slots=run.rl.max_slots,
                             kv_cache_gib=run.rl.kv_cache_gib)
    t0 = time.perf_counter()
    slots, program = fit_slots(
        cfg, rollout_mesh(jax.devices(), rollout["rollout_mesh"]["tensor"]), most=rollout["slots"], budget_bytes=budget,
        resident_bytes=resident, **shape, image_patches=args.image_patches, rules=run.mesh.rules)
    program["compile_seconds"] = round(time.perf_counter() - t0, 2)
    arithmetic_slots = rollout["slots"]
    if slots != arithmetic_slots:  # the breakdown of the slots the compiled program fits with
        rollout = rollout_memory(cfg, **shape, **plan_args, rollout_mesh=rollout["rollout_mesh"]["tensor"],
                                 max_slots=slots)
    total = program["peak_bytes"] + resident
    # the XLA CPU backend computes bf16 dots in f32 and hoists f32 copies of the loop-invariant weights out of the
    # decode loop: about twice the rollout weights that bf16 hardware (TPU/GPU) does not allocate
    program["cpu_f32_weight_copies_bytes"] = 2 * rollout["rollout_weights_bytes"] if cfg.dtype in (
        "bfloat16", "float16") else 0
    program["bf16_hardware_estimate_gib"] = (total - program["cpu_f32_weight_copies_bytes"]) / GIB
    rollout = {**rollout, "arithmetic_slots": arithmetic_slots, "estimate_total_bytes": rollout["total_bytes"],
               "estimate_total_gib": rollout["total_gib"], "program": program, "total_bytes": total,
               "total_gib": total / GIB, "fits": total <= budget, "headroom_gib": (budget - total) / GIB}
    update = {k: plan[k] for k in ("peak_bytes", "total_bytes", "total_gib", "fits", "headroom_gib")}
    return {**plan, "update": update, "rollout": rollout, "fits": update["fits"] and rollout["fits"]}


def print_rollout_plan(r: dict, budget_gib: float) -> None:
    mesh = ",".join(f"{k}={v}" for k, v in r["rollout_mesh"].items())
    print(f"rollout: layout {mesh}; {r['slots']} decode slots ({r['slots_per_group']} per data group) for "
          f"{r['samples']} samples of up to {r['slot_tokens']} tokens")
    if r["slots"] != r["arithmetic_slots"]:
        print(f"  the KV budget's default ({r['arithmetic_slots']} slots) does not fit once compiled: "
              f"set rl.max_slots={r['slots']}")
    print("per device, arithmetic breakdown:")
    for key in ("resident_train_state", "rollout_weights", "kv_cache", "prefill_cache", "outputs", "transients"):
        print(f"  {key.replace('_', ' '):<38}{r[key + '_bytes'] / GIB:10.2f} GiB")
    print(f"  {'estimate':<38}{r['estimate_total_gib']:10.2f} GiB")
    prog = r["program"]
    print(f"per device, the compiled rollout program (slots fitted in {prog['compile_seconds']:.1f} s of compiles; "
          "the XLA CPU backend runs bf16 as f32, with f32 copies of the weights and KV-cache updates, so this is "
          "an upper bound):")
    for key in ("argument", "output", "temp", "peak"):
        print(f"  {key:<38}{prog[key + '_bytes'] / GIB:10.2f} GiB")
    print(f"  {'+ resident train state':<38}{r['resident_train_state_bytes'] / GIB:10.2f} GiB")
    if prog["cpu_f32_weight_copies_bytes"]:
        print(f"  of which f32 copies of the bf16 weights that only the CPU backend makes (~2 x rollout weights): "
              f"{prog['cpu_f32_weight_copies_bytes'] / GIB:.2f} GiB; on bf16 hardware about "
              f"{prog['bf16_hardware_estimate_gib']:.2f} GiB")
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    print(f"rollout {verdict}: {r['total_gib']:.2f} GiB of the {budget_gib:g} GiB budget per device")


if __name__ == "__main__":
    sys.exit(main())

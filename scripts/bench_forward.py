#!/usr/bin/env python
"""Time a jitted forward+backward of specs-jax's Qwen2.5-VL against transformers (PyTorch) on the
same ~30-100M-parameter config, the same weights and the same inputs, in one run, and print the ratio.
The contenders are timed in alternation (rounds that run each once, in rotated order; medians), so that the
load of a shared machine weighs on all of them alike.

The loss is the mean next-token cross-entropy over a batch of text rows, one of which holds an
image, so both the vision tower and the decoder are differentiated. Compilation is timed
separately and excluded from the steady-state figure.

specs-jax runs once per attention backend (``--attention``, default: the XLA dense-mask reference
and blockwise, plus the machine's default backend if it is another one: splash on TPU, cuDNN on
GPU). Then the temporary memory of the compiled forward+backward at ``--mem-batch x --mem-seq``
(default 2 x 2048; compiled only, never run) is printed per backend, from XLA's memory analysis: for the
step as timed, with the trainer's chunked log-probs, with the long-sequence configs' ``model.remat=full``
(then the saved activations are the layer inputs and one layer's recomputation is what remains, so the
attention's share shows), the same with the sequence-tiled MLP (``--mlp-tile``, ``model.mlp_tile``: that
layer's MLP activations for one tile of positions at a time), and for one layer's attention alone.
The last line is the speed ratio of the machine's default backend (``model.attention=auto``).
``--profile`` also traces a few steps of that backend (``jax.profiler``) and prints where the time goes: the
share of XLA's operations by kind (matmuls, layout copies/transposes, ...) and the costliest operations with
their shapes and the JAX operation they come from.

    python scripts/bench_forward.py                # default ~60M config, batch 4 x 256
    python scripts/bench_forward.py --batch 8 --seq 512 --iters 5 --attention blockwise
    python scripts/bench_forward.py --profile --mem-seq 0
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def build_config(args):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config=dict(depth=args.vision_depth, hidden_size=256, num_heads=4, intermediate_size=768,
                           out_hidden_size=args.hidden, fullatt_block_indexes=[args.vision_depth - 1],
                           window_size=112),
        text_config=dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=3 * args.hidden, vocab_size=args.vocab,
                         bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
        image_token_id=args.vocab - 1, video_token_id=args.vocab - 2, vision_start_token_id=args.vocab - 3,
        vision_end_token_id=args.vocab - 4, tie_word_embeddings=False)


def make_batch(args, cfg):
    rng = np.random.RandomState(0)
    ids = rng.randint(5, args.vocab - 5, (args.batch, args.seq))
    grid = (1, 16, 16)  # a 224 x 224 image: 256 patches, 64 image tokens
    n_tokens = 64
    ids[0, 4] = cfg.vision_start_token_id
    ids[0, 5:5 + n_tokens] = cfg.image_token_id
    ids[0, 5 + n_tokens] = cfg.vision_end_token_id
    pixels = rng.randn(256, 3 * 2 * 14 * 14).astype(np.float32)
    return ids, pixels, np.array([grid])


def time_interleaved(steps: dict, iters: int) -> dict:
    """Median seconds per call of each of ``steps`` (name -> warmed-up callable), timed in ``iters`` rounds
    that call every step once, the order rotated each round: a slow spell of this shared machine then
    falls on every contender alike instead of on whichever was being timed at the time."""
    times = {name: [] for name in steps}
    names = list(steps)
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def make_step(labels, chunked: bool = False):
    """Jitted ``(loss, grads)`` of the mean next-token NLL: from full logits (the timed step, as
    transformers computes it) or, ``chunked``, from the hidden states with the trainer's
    vocabulary-chunked log-probs (``token_logps_from_hidden``: no ``[B, T, V]`` logits)."""
    import jax
    import optax
    from flax import nnx

    from specs_jax.losses import token_logps_from_hidden

    @nnx.jit
    def step(model, inputs):
        def loss_fn(model):
            if chunked:
                hidden = model.hidden_states(inputs)[:, :-1]
                return -token_logps_from_hidden(hidden, model.lm_head_weight().astype(hidden.dtype), labels).mean()
            logits = model.forward(inputs)[:, :-1].astype(jax.numpy.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return nnx.value_and_grad(loss_fn)(model)

    return step


def bench_jax(path, ids, pixels, grid, attention="auto", profile: bool = False):
    """(loss, first call's seconds, the warmed-up step as a callable, profile lines or None) of the jitted step."""
    import jax
    from flax import nnx

    import specs_jax
    from specs_jax.model import prepare_inputs

    model = specs_jax.load_model(path, attention=attention)
    inputs = prepare_inputs(model.config, ids, None, pixels, grid)
    step = make_step(jax.numpy.asarray(ids[:, 1:]))

    start = time.perf_counter()
    loss, grads = step(model, inputs)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - start
    run = lambda: jax.block_until_ready(step(model, inputs))
    run()
    lines = None
    if profile:
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda state, inputs: step(nnx.merge(graphdef, state), inputs))
        compiled = fn.lower(state, inputs).compile()  # the program profiled is the one whose text is read
        lines = profile_lines(profile_ops(lambda: jax.block_until_ready(compiled(state, inputs)), compiled.as_text()))
    return float(loss), compile_s, run, lines


OP_KINDS = (  # (kind, predicate on an XLA operation's name), first match wins
    ("matmuls (dot fusions)", lambda n: any(k in n for k in ("ynn_fusion", "xnn_fusion", "onednn", "dot", "gemm"))),
    ("layout copies / transposes", lambda n: "copy" in n or "transpose" in n),
    ("scanned-layer slicing (dynamic-(update-)slice, while)", lambda n: "dynamic" in n or n.startswith("while")),
)


def profile_ops(run, hlo_text: str, steps: int = 3, top: int = 8) -> dict:
    """Trace ``steps`` calls of ``run`` with ``jax.profiler`` and summarise the XLA operations' time (summed over
    the threads that ran them): ``{"kinds": {kind: share}, "ops": [(name, share, shape, origin)], "ms_per_step"}``,
    the share per kind (:data:`OP_KINDS`, else ``other``) and the ``top`` costliest operations with their result
    shape and JAX operation (from the compiled program's text ``hlo_text``)."""
    import collections
    import glob
    import gzip
    import json
    import os
    import re

    import jax

    run()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        (trace,) = glob.glob(os.path.join(d, "plugins", "profile", "*", "perfetto_trace.json.gz"))
        with gzip.open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op = collections.Counter()
    for e in events:  # XLA's operations are the lower-case names (runtime and Python events are not)
        if e.get("ph") == "X" and e["name"][:1].islower() and not e["name"].startswith("end: "):
            per_op[e["name"]] += e.get("dur", 0)
    total = sum(per_op.values()) or 1
    kinds = collections.Counter()
    for name, us in per_op.items():
        kinds[next((k for k, match in OP_KINDS if match(name)), "other")] += us
    ops = []
    for name, us in per_op.most_common(top):
        m = re.search(rf"%{re.escape(name)} = (\S+) .*?op_name=\"([^\"]*)\"", hlo_text)
        ops.append((name, us / total, *((m.group(1), m.group(2)) if m else ("?", "?"))))
    return {"kinds": {k: us / total for k, us in kinds.most_common()}, "ops": ops,
            "ms_per_step": total / steps / 1e3}


def profile_lines(profile: dict) -> list[str]:
    """:func:`profile_ops`' summary as printed lines."""
    import re

    lines = [f"  {100 * share:5.1f}%  {kind}" for kind, share in profile["kinds"].items()]
    lines.append(f"  costliest operations ({profile['ms_per_step']:.1f} ms of operation time per step):")
    lines += [f"  {100 * share:5.1f}%  {name:<30} {shape:<24} {re.sub(r'^(jit[(][^)]*[)]/)+', '', origin)[-80:]}"
              for name, share, shape, origin in profile["ops"]]
    return lines


def temp_memory(path, ids, pixels, grid, attention, chunked: bool, remat: str = "none", mlp_tile: int = 0) -> int:
    """Bytes of XLA temporaries of the compiled forward+backward step (compiled, not run); ``remat``: the
    model's rematerialisation policy of its scanned layers; ``mlp_tile``: its sequence-tiled MLP."""
    import jax
    from flax import nnx

    import specs_jax
    from specs_jax.model import prepare_inputs

    model = specs_jax.load_model(path, attention=attention, remat=remat, mlp_tile=mlp_tile)
    inputs = prepare_inputs(model.config, ids, None, pixels, grid)
    step = make_step(jax.numpy.asarray(ids[:, 1:]), chunked)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, inputs: step(nnx.merge(graphdef, state), inputs))
    return int(fn.lower(state, inputs).compile().memory_analysis().temp_size_in_bytes)


def attention_temp_memory(cfg, batch: int, seq: int, attention: str) -> int:
    """Bytes of XLA temporaries of one decoder layer's attention, forward+backward, at ``batch x seq``."""
    import jax
    import jax.numpy as jnp

    from specs_jax.model.attention import Segments
    from specs_jax.model.attention import attention as attend

    t = cfg.text_config
    n, k, d = t.num_attention_heads, t.num_key_value_heads, t.hidden_size // t.num_attention_heads
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

    def loss(q, kk, v, seg):
        return attend(q, kk, v, Segments(seg, seg), scale=d**-0.5, causal=True, backend=attention).sum()

    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).lower(sds(batch, seq, n, d), sds(batch, seq, k, d),
                                                       sds(batch, seq, k, d), jax.ShapeDtypeStruct((batch, seq),
                                                                                                   jnp.int32))
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def bench_torch(path, ids, pixels, grid):
    """(loss, the warmed-up forward+backward step as a callable) of transformers' model."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.train()
    ids_t = torch.tensor(ids)
    kw = dict(input_ids=ids_t, pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
              mm_token_type_ids=(ids_t == model.config.image_token_id).long())

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(**kw).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1))
        loss.backward()
        return float(loss)

    loss = step()  # warm-up
    step()
    return loss, step


def jax_platform() -> str:
    import jax

    return jax.default_backend()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=7,
                   help="timed rounds; each calls every contender once, in rotated order (median reported)")
    p.add_argument("--attention", action="append", default=None,
                   choices=("auto", "xla", "blockwise", "splash", "cudnn"),
                   help="specs-jax attention backend to time (repeat for several; default: xla, blockwise and the "
                        "machine's default)")
    p.add_argument("--mem-batch", type=int, default=2)
    p.add_argument("--mem-seq", type=int, default=2048, help="0: skip the memory comparison")
    p.add_argument("--mlp-tile", type=int, default=512,
                   help="model.mlp_tile of the last whole-step memory line (default: %(default)s)")
    p.add_argument("--profile", action="store_true",
                   help="also print where the default backend's step spends its time (jax.profiler trace)")
    args = p.parse_args()

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = build_config(args)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(cfg)
    n_params = sum(p.numel() for p in hf.parameters())
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    del hf
    ids, pixels, grid = make_batch(args, cfg)
    print(f"config: {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens (one 224px image), "
          f"torch threads {torch.get_num_threads()}")
    from specs_jax.model.attention import resolve_backend

    default = resolve_backend("auto")
    backends = list(dict.fromkeys(resolve_backend(a) for a in (args.attention or ["xla", "blockwise", default])))
    loss_t, torch_step = bench_torch(path, ids, pixels, grid)
    ref = default if default in backends else backends[-1]
    results = {a: bench_jax(path, ids, pixels, grid, a, profile=args.profile and a == ref) for a in backends}
    seconds = time_interleaved({"transformers": torch_step, **{a: r[2] for a, r in results.items()}}, args.iters)
    torch_s = seconds["transformers"]
    tokens = args.batch * args.seq
    print(f"loss: transformers {loss_t:.6f}  " + "  ".join(f"specs-jax[{a}] {r[0]:.6f}" for a, r in results.items()))
    print(f"transformers          fwd+bwd: {torch_s * 1e3:8.1f} ms/step  {tokens / torch_s:9.0f} tokens/s")
    for a, (_, compile_s, _, _) in results.items():
        jax_s = seconds[a]
        print(f"specs-jax {a:<11} fwd+bwd: {jax_s * 1e3:8.1f} ms/step  {tokens / jax_s:9.0f} tokens/s  "
              f"(first call incl. compile {compile_s:.1f} s)  ratio {torch_s / jax_s:.2f}x")
    if args.mem_seq:
        m_args = argparse.Namespace(**{**vars(args), "batch": args.mem_batch, "seq": args.mem_seq})
        m_ids, m_pixels, m_grid = make_batch(m_args, cfg)
        shape = f"batch {args.mem_batch} x {args.mem_seq}"
        for what, measure in (
                ("model step, full-logits loss (as timed)",
                 lambda a: temp_memory(path, m_ids, m_pixels, m_grid, a, chunked=False)),
                ("model step, trainer's chunked log-probs loss",
                 lambda a: temp_memory(path, m_ids, m_pixels, m_grid, a, chunked=True)),
                ("model step, chunked log-probs, remat=full (as configs/*_7b.yaml train)",
                 lambda a: temp_memory(path, m_ids, m_pixels, m_grid, a, chunked=True, remat="full")),
                (f"model step, chunked log-probs, remat=full, mlp_tile={args.mlp_tile}",
                 lambda a: temp_memory(path, m_ids, m_pixels, m_grid, a, chunked=True, remat="full",
                                       mlp_tile=args.mlp_tile)),
                ("one decoder layer's attention",
                 lambda a: attention_temp_memory(cfg, args.mem_batch, args.mem_seq, a))):
            temps = {a: measure(a) for a in ("xla", "blockwise")}
            line = "  ".join(f"{a} {t / 2**20:7.1f} MiB" for a, t in temps.items())
            print(f"temp memory of fwd+bwd at {shape}, {what}: {line}  "
                  f"(xla / blockwise {temps['xla'] / temps['blockwise']:.1f}x)")
    if results[ref][3]:
        print(f"where the time of specs-jax {ref}'s step goes "
              "(jax.profiler, operation time summed over XLA's threads):")
        print("\n".join(results[ref][3]))
    print(f"default attention backend on {jax_platform()}: {default}" + ("" if ref == default else f" (timed: {ref})"))
    print(f"speed ratio specs-jax / transformers: {torch_s / seconds[ref]:.2f}x")


if __name__ == "__main__":
    main()

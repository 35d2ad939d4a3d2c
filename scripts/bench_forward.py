#!/usr/bin/env python
"""Time a jitted forward+backward of specs-jax's Qwen2.5-VL against transformers (PyTorch) on the
same ~30-100M-parameter config, the same weights and the same inputs, in one run, and print the ratio.

The loss is the mean next-token cross-entropy over a batch of text rows, one of which holds an
image, so both the vision tower and the decoder are differentiated. Compilation is timed
separately and excluded from the steady-state figure.

specs-jax runs once per attention backend (``--attention``, default: the XLA dense-mask reference
and blockwise, plus the machine's default backend if it is another one: splash on TPU, cuDNN on
GPU). Then the temporary memory of the compiled forward+backward at ``--mem-batch x --mem-seq``
(default 2 x 2048; compiled only, never run) is printed per backend, from XLA's memory analysis: for the
step as timed, with the trainer's chunked log-probs, with the long-sequence configs' ``model.remat=full``
(then the saved activations are the layer inputs and one layer's recomputation is what remains, so the
attention's share shows), and for one layer's attention alone.
The last line is the speed ratio of the machine's default backend (``model.attention=auto``).

    python scripts/bench_forward.py                # default ~60M config, batch 4 x 256
    python scripts/bench_forward.py --batch 8 --seq 512 --iters 5 --attention blockwise
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


def time_it(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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


def bench_jax(path, ids, pixels, grid, iters, attention="auto"):
    import jax

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
    return float(loss), compile_s, time_it(run, iters)


def temp_memory(path, ids, pixels, grid, attention, chunked: bool, remat: str = "none") -> int:
    """Bytes of XLA temporaries of the compiled forward+backward step (compiled, not run); ``remat``: the
    model's rematerialisation policy of its scanned layers."""
    import jax
    from flax import nnx

    import specs_jax
    from specs_jax.model import prepare_inputs

    model = specs_jax.load_model(path, attention=attention, remat=remat)
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


def bench_torch(path, ids, pixels, grid, iters):
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
    return loss, time_it(step, iters)


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
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--attention", action="append", default=None,
                   choices=("auto", "xla", "blockwise", "splash", "cudnn"),
                   help="specs-jax attention backend to time (repeat for several; default: xla, blockwise and the "
                        "machine's default)")
    p.add_argument("--mem-batch", type=int, default=2)
    p.add_argument("--mem-seq", type=int, default=2048, help="0: skip the memory comparison")
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
    loss_t, torch_s = bench_torch(path, ids, pixels, grid, args.iters)
    results = {a: bench_jax(path, ids, pixels, grid, args.iters, a) for a in backends}
    tokens = args.batch * args.seq
    print(f"loss: transformers {loss_t:.6f}  " + "  ".join(f"specs-jax[{a}] {r[0]:.6f}" for a, r in results.items()))
    print(f"transformers          fwd+bwd: {torch_s * 1e3:8.1f} ms/step  {tokens / torch_s:9.0f} tokens/s")
    for a, (_, compile_s, jax_s) in results.items():
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
                ("one decoder layer's attention",
                 lambda a: attention_temp_memory(cfg, args.mem_batch, args.mem_seq, a))):
            temps = {a: measure(a) for a in ("xla", "blockwise")}
            line = "  ".join(f"{a} {t / 2**20:7.1f} MiB" for a, t in temps.items())
            print(f"temp memory of fwd+bwd at {shape}, {what}: {line}  "
                  f"(xla / blockwise {temps['xla'] / temps['blockwise']:.1f}x)")
    ref = default if default in results else backends[-1]
    print(f"default attention backend on {jax_platform()}: {default}" + ("" if ref == default else f" (timed: {ref})"))
    print(f"speed ratio specs-jax / transformers: {torch_s / results[ref][2]:.2f}x")


if __name__ == "__main__":
    main()

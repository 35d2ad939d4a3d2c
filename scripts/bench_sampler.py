#!/usr/bin/env python
"""Decode throughput and time-to-first-token of specs-jax's Sampler vs transformers' ``generate``.

Same config (~60M parameters by default), same weights, same prompts, measured in one run, at
batch sizes 1, 8 and 16. Both decode greedily for exactly ``--new-tokens`` tokens (no early EOS).

- TTFT: a generate call with one new token (prefill + first token). specs-jax is shown with and
  without compilation (first call of a shape vs a warm call).
- decode tokens/s: ``batch * (N - 1) / (time(N new tokens) - time(1 new token))``.

On a GPU (``--device gpu`` runs JAX there; transformers uses CUDA if available), the script also
reports decode bandwidth as a fraction of the HBM roofline: bytes of parameters + KV cache read
per decode step / step time, against ``--hbm-gbps`` (default 3350, H100 SXM).

    python scripts/bench_sampler.py
    python scripts/bench_sampler.py --batches 1 8 16 --new-tokens 64 --prompt-len 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ttft_and_decode(gen, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Median TTFT and median decode time of ``new_tokens - 1`` steps, each repeat timing the
    one-token and the full call back to back (robust to load changes on a shared machine)."""
    pairs = [(clock(lambda: gen(1)), clock(lambda: gen(new_tokens))) for _ in range(repeats)]
    return float(np.median([a for a, _ in pairs])), float(np.median([b - a for a, b in pairs]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth for the roofline (GPU only)")
    args = p.parse_args()

    import jax
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import specs_jax
    from bench_forward import build_config
    from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams

    cfg_args = argparse.Namespace(hidden=args.hidden, layers=args.layers, vocab=args.vocab, vision_depth=2)
    cfg = build_config(cfg_args)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(device)
    n_params = sum(p.numel() for p in hf.parameters())
    model = specs_jax.load_model(path)
    greedy = SamplingParams(temperature=0)
    never = -1  # an EOS id no token equals: both sides decode the full length
    samplers = {n: Sampler(model, None, SamplerConfig(max_new_tokens=n), eos_ids=[never], pad_id=0)
                for n in (1, args.new_tokens)}
    platform = jax.devices()[0].platform
    print(f"config: {n_params / 1e6:.1f}M params, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"greedy; JAX on {platform}, torch on {device} ({torch.get_num_threads()} threads)")
    print(f"{'batch':>5} | {'HF TTFT s':>9} {'HF dec tok/s':>12} | {'JAX TTFT s':>10} {'(+compile)':>10} "
          f"{'JAX dec tok/s':>13} | {'decode ratio':>12}")
    rng = np.random.default_rng(0)
    for b in args.batches:
        ids = rng.integers(5, args.vocab - 5, (b, args.prompt_len))

        def hf_gen(n):
            with torch.no_grad():
                hf.generate(input_ids=torch.tensor(ids, device=device), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0, eos_token_id=cfg.text_config.eos_token_id)

        def jax_gen(n):
            samplers[n].generate_ids(ids, params=greedy, decode=False)

        start = time.perf_counter()
        jax_gen(1)
        ttft_compile = time.perf_counter() - start
        jax_gen(args.new_tokens)  # compile the long program outside the timing
        hf_gen(1)
        hf_ttft, hf_decode = ttft_and_decode(hf_gen, args.new_tokens, args.repeats)
        jx_ttft, jx_decode = ttft_and_decode(jax_gen, args.new_tokens, args.repeats)
        tokens = b * (args.new_tokens - 1)
        hf_tps, jx_tps = tokens / hf_decode, tokens / jx_decode
        print(f"{b:>5} | {hf_ttft:9.3f} {hf_tps:12.1f} | {jx_ttft:10.3f} {ttft_compile:10.2f} {jx_tps:13.1f} | "
              f"{jx_tps / hf_tps:11.2f}x")
        if platform == "gpu":
            t = cfg.text_config
            head_dim = t.hidden_size // t.num_attention_heads
            kv_bytes = 2 * t.num_hidden_layers * b * (args.prompt_len + args.new_tokens / 2) * \
                t.num_key_value_heads * head_dim * 4
            step_s = jx_decode / (args.new_tokens - 1)
            gbps = (n_params * 4 + kv_bytes) / step_s / 1e9
            print(f"      decode bandwidth {gbps:.0f} GB/s = {gbps / args.hbm_gbps:.1%} of the {args.hbm_gbps:.0f} GB/s "
                  f"HBM roofline")


if __name__ == "__main__":
    main()

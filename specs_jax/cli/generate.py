"""``specs-jax generate --model PATH [--step latest|best|N] [--image IMG ...] --prompt TEXT [sampling flags]``."""

from __future__ import annotations

import argparse

from specs_jax.model.config import ATTENTION_BACKENDS, DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample a response from a model",
                       description="Apply the model's chat template to PROMPT (with the given images), sample "
                                   "with the specs-jax sampler and print the response(s). The model directory "
                                   "must hold the processor/tokenizer files (as HF checkpoints do).")
    p.add_argument("--model", required=True,
                   help="HF model directory, specs-jax Orbax checkpoint, or training checkpoint RUN/checkpoints/STEP "
                        "(or RUN with --step)")
    p.add_argument("--step", default=None, metavar="latest|best|N",
                   help="with --model a run directory (train.output_dir): which checkpoint")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples for the prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    p.add_argument("--eos-id", action="append", type=int, default=[], metavar="ID",
                   help="stop token id (repeat for several); replaces the default set: the config's and "
                        "tokenizer's EOS plus generation_config.json's eos_token_id")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                   help="attention backend: auto (splash on TPU, cudnn on GPU, blockwise on CPU), xla (dense-mask "
                        "reference), splash, cudnn, blockwise (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image

    import specs_jax
    from specs_jax.data.tokenizer import load_processor
    from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    images = []
    for file in args.image:
        if not Path(file).is_file():
            raise FileNotFoundError(f"--image {file}: no such file")
        try:
            images.append(Image.open(file).convert("RGB"))
        except OSError as e:
            raise ValueError(f"--image {file}: not a readable image ({e})") from e
    from specs_jax.convert.training import resolve_reference

    model_path = resolve_reference(args.model, args.step)  # a run's latest/best -> that step's directory
    processor = load_processor(model_path)
    model = specs_jax.load_model(model_path, dtype=args.dtype, attention=args.attention)
    sampler = Sampler(model, processor, SamplerConfig(max_new_tokens=args.max_new_tokens), eos_ids=args.eos_id or None)
    out = sampler.generate([args.prompt], [images], n=args.num_samples, params=params, seed=args.seed,
                           stop=args.stop, system=args.system)
    for i, text in enumerate(out.texts):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(text)
    return 0

#!/usr/bin/env python
"""Training-step throughput of specs-jax against PyTorch/transformers, measured in one run.

For each model shape (``--configs``), the same randomly initialised Qwen2.5-VL checkpoint (written
once by transformers, loaded by both sides) and the same inputs:

- DPO-hybrid step (SPECS stage 2, loss settings of configs/dpo_7b.yaml): ours is
  ``Trainer(cfg, "dpo").train_step`` (policy forward+backward on chosen+rejected, the frozen
  reference forward, DPO + lambda*SFT, AdamW with clipping, all one jitted program); the reference
  is the same in eager PyTorch on ``Qwen2_5_VLForConditionalGeneration`` (policy forward+backward,
  reference forward under no_grad, the loss in torch, ``clip_grad_norm_`` + ``AdamW.step``).
- SFT step: token-mean NLL of the responses, likewise.
- GRPO step (loss and sampling settings of configs/grpo_7b.yaml: no KL, clip 0.2/0.28, token-mean,
  T=1), timed as the trainer's two phases: ``RLTrainer.collect`` (rollout: sampling of
  ``--group-size`` completions per prompt and their detokenisation; scoring: ``score_batch`` on the
  decoded texts, reported by collect as ``time/score_s``; advantages, the accuracy filter and the
  step batch) and ``RLTrainer.update`` (one jitted optimizer step).
  The reference runs the identical ``rollout`` with transformers' ``generate`` behind the sampler
  interface (same prompts and images, same ``max_new_tokens``, sampling at T=1 with top-k/top-p off,
  log-probs from the generation scores) and a torch update (forward+backward of the clipped
  objective, AdamW). Prompts: synthetic SPECS questions (``specs_jax.data.synth``, one image each)
  with the GRPO system prompt, tokenised by a byte-level BPE trained here; the batch is fixed over
  the steps so no step recompiles.

Every figure is the median over ``--steps`` steps after one warm-up step (the first call, which
compiles, is reported separately). On CPU the two sides alternate step by step so that both see
the same machine load; on an accelerator they run one after the other (freeing the first side's
memory). Ratios are ``torch time / specs-jax time`` (> 1: specs-jax is faster); nothing is asserted.
The "loss check" line compares the first step's loss of both sides (same weights, same batch).

Tokens: DPO/SFT count attended tokens; the GRPO step counts prompt + generated tokens (as the
trainer's throughput), the rollout generated tokens, the update the attended tokens of its rows.

MFU (accelerators only; ``specs_jax.training.logging.peak_flops_per_device`` knows no CPU peak):
the trainer's own model-FLOP count (``trainer.flops_per_token``: ``6 N`` per token for each update's
forward+backward plus ``2 N`` per extra forward, i.e. the DPO reference or the GRPO rollout),
``N`` = decoder + LM-head matmul parameters, over the bf16 peak of the device.
``--configs 1b`` is the shape meant for this (compute in bf16, fp32 master weights).

Examples::

    python scripts/bench_train.py                                    # tiny and 100m, ~4 min on 2 CPU cores
    python scripts/bench_train.py --configs tiny --steps 10
    python scripts/bench_train.py --configs 100m --batch 1 --skip-torch
    python scripts/bench_train.py --configs 1b                       # on a GPU/TPU: adds MFU lines
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT_BUCKET = 128  # GRPO prompts (system prompt, image and question) longer than this are skipped
SIDES = ("specs-jax", "torch")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A benchmark model shape (text decoder + vision tower) and its default workload."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the size of the tokenizer trained here (padded to a multiple of 64)
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    image_px: int  # side of the synthetic images (56: 4 image tokens, 112: 16)
    batch: int  # DPO pairs, SFT rows, GRPO prompts per step
    seq_len: int  # DPO/SFT row length
    group_size: int
    max_new_tokens: int
    steps: int

    def describe(self, vocab: int) -> str:
        return (f"text: hidden {self.hidden}, {self.layers} layers, {self.heads} heads ({self.kv_heads} KV), "
                f"MLP {self.intermediate}, vocab {vocab} ({'tied' if self.tied else 'untied'} LM head); "
                f"vision: depth {self.vision_depth}, hidden {self.vision_hidden}, {self.vision_heads} heads, "
                f"MLP {self.vision_intermediate}; one {self.image_px}px image per row")


SHAPES = {
    # models/tiny.json with the tokenizer's vocabulary (the shape of the tests and *_tiny configs)
    "tiny": Shape(64, 2, 4, 2, 172, None, True, 2, 32, 2, 64, 56,
                  batch=4, seq_len=64, group_size=4, max_new_tokens=64, steps=10),
    # ~100M parameters: a 32k vocabulary as in scripts/bench_forward.py, untied head, small vision tower
    "100m": Shape(768, 8, 12, 2, 2048, 32000, False, 2, 256, 4, 768, 56,
                  batch=2, seq_len=128, group_size=4, max_new_tokens=32, steps=3),
    # Qwen2.5-VL-3B widths (text and vision) with 16 of its 36 decoder layers and 4 vision blocks:
    # ~1.5B parameters; meant for an accelerator (MFU), far too slow for a CPU run
    "1b": Shape(2048, 16, 16, 2, 11008, 151936, True, 4, 1280, 16, 3420, 112,
                batch=4, seq_len=1024, group_size=8, max_new_tokens=256, steps=5),
}


# --------------------------------------------------------------------------------------------
# the world of one config: tokenizer, prompts, checkpoint
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class World:
    name: str
    shape: Shape
    path: str  # HF checkpoint directory both sides load
    hf_dict: dict  # its config.json (flat layout)
    processor: Any
    prompts: dict  # one GRPO prompt batch (rl_batches), reused every step
    n_params: int
    n_matmul: int  # decoder + LM head matmul parameters (N of the MFU)
    image_grid: tuple[int, int, int]
    dtype: str  # compute dtype of both sides
    device: str  # torch device


def stage_settings() -> tuple[Any, Any]:
    """The SPECS stage configs the loss and sampling settings come from (DPO-hybrid, GRPO)."""
    from specs_jax.training.config import load_config

    return (load_config(ROOT / "configs" / "dpo_7b.yaml", ["model.path=unused"]),
            load_config(ROOT / "configs" / "grpo_7b.yaml", ["model.path=unused", "data.train_path=unused"]))


def build_world(name: str, shape: Shape, args: argparse.Namespace, system_prompt: str | None) -> World:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from specs_jax.data.pipeline import DataConfig, rl_batches
    from specs_jax.data.synth import SynthConfig, synth_dataset
    from specs_jax.data.tokenizer import ProcessorConfig, build_processor, model_token_fields
    from specs_jax.model import load_preset

    ds = synth_dataset(SynthConfig(n_train=64, n_id_test=0, n_ood_test=0, size=shape.image_px))["train"]
    processor = build_processor(list(ds["question"]) + list(ds["solution"]), ProcessorConfig(vocab_size=300))
    tokens = model_token_fields(processor.tokenizer)
    if shape.vocab is not None:
        tokens["vocab_size"] = shape.vocab
    head_dim = shape.hidden // shape.heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen's [16, 24, 24] at head_dim 128
    vision = {**load_preset("tiny").hf_config["vision_config"], "depth": shape.vision_depth,
              "hidden_size": shape.vision_hidden, "num_heads": shape.vision_heads,
              "intermediate_size": shape.vision_intermediate, "out_hidden_size": shape.hidden,
              "fullatt_block_indexes": [shape.vision_depth - 1], "window_size": 112}
    hf_dict = {**load_preset("tiny").hf_config, "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
               "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
               "intermediate_size": shape.intermediate, "tie_word_embeddings": shape.tied,
               "vision_config": vision, "rope_scaling": {"type": "mrope", "mrope_section": section}, **tokens}
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_dict))
    n_params = sum(p.numel() for p in hf.parameters())
    n_vision = sum(p.numel() for p in hf.model.visual.parameters())
    n_matmul = n_params - n_vision - (0 if shape.tied else hf_dict["vocab_size"] * shape.hidden)
    path = tempfile.mkdtemp(prefix=f"bench_train_{name}_")
    hf.save_pretrained(path)
    processor.save_pretrained(path)
    del hf
    batch = args.batch or shape.batch
    data = rl_batches(ds, processor, DataConfig(batch_size=batch, buckets=(PROMPT_BUCKET,), seed=0, num_epochs=None,
                                                system_prompt=system_prompt))
    prompts = next(iter(data))
    side = shape.image_px // 14
    import jax

    platform = jax.devices()[0].platform
    dtype = args.dtype if args.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
    device = "cuda" if torch.cuda.is_available() and platform == "gpu" else "cpu"
    return World(name, shape, path, hf_dict, processor, prompts, n_params, n_matmul, (1, side, side), dtype, device)


# --------------------------------------------------------------------------------------------
# specs-jax sides
# --------------------------------------------------------------------------------------------

def run_config(world: World, args: argparse.Namespace, kind: str, stage: Any) -> Any:
    """The RunConfig of a ``kind`` (dpo | sft | grpo) trainer on the world's checkpoint."""
    from specs_jax.training.config import load_config

    shape = world.shape
    overrides = [f"model.path={world.path}", f"model.dtype={world.dtype}", "model.param_dtype=float32",
                 f"train.batch_size={args.batch or shape.batch}", "optim.grad_accum_steps=1",
                 f"train.output_dir={tempfile.mkdtemp(prefix='bench_train_run_')}", "log.progress=false",
                 "log.tensorboard=false", "log.jsonl=false", "checkpoint.async_save=false"]
    if kind == "dpo":
        overrides += [f"loss.name={stage.loss.name}", f"loss.kwargs={json.dumps(stage.loss.kwargs)}"]
    if kind == "grpo":
        rl = stage.rl
        overrides += ["loss.name=grpo", f"loss.kwargs={json.dumps(stage.loss.kwargs)}",
                      f"train.max_length={PROMPT_BUCKET}", f"rl.group_size={args.group_size or shape.group_size}",
                      f"rl.max_new_tokens={args.max_new_tokens or shape.max_new_tokens}",
                      f"rl.temperature={rl.temperature}", f"rl.top_p={rl.top_p}", f"rl.top_k={rl.top_k}",
                      f"rl.scale_rewards={rl.scale_rewards or 'group'}"]
    return load_config(None, overrides)


def synthetic_batch(world: World, args: argparse.Namespace, kind: str) -> dict[str, np.ndarray]:
    from specs_jax.model import from_hf_dict
    from specs_jax.training.synthetic import random_dpo_batch, random_sft_batch

    make = random_dpo_batch if kind == "dpo" else random_sft_batch
    return make(from_hf_dict(world.hf_dict), np.random.RandomState(0), args.batch or world.shape.batch,
                args.seq_len or world.shape.seq_len, image_grid=world.image_grid)


def ours_supervised(world: World, args: argparse.Namespace, kind: str, cfg: Any, batch: dict) -> tuple[Callable, Callable]:
    """(step, close) of our DPO or SFT trainer."""
    from specs_jax.training.trainer import Trainer

    trainer = Trainer(cfg, kind)

    def step() -> dict[str, float]:
        start = time.perf_counter()
        metrics = trainer.train_step(batch)  # returns host floats: the step has finished
        seconds = time.perf_counter() - start
        return {"step": seconds, "loss": metrics["loss"], "tokens": trainer.last_tokens,
                "flops": trainer.flops_per_token * trainer.last_tokens}

    return step, trainer.close


def phase_record(t0: float, t1: float, t2: float, score_s: float, ro: Any, seqs: dict,
                 flops_per_token: float) -> dict[str, float]:
    """The timed record of one GRPO step (collect in ``[t0, t1]``, update in ``[t1, t2]``)."""
    gen = ro.generation
    tokens = float(gen.mask.sum() + gen.prompt_mask.sum())
    return {"step": t2 - t0, "rollout": t1 - t0 - score_s, "score": score_s, "update": t2 - t1,
            "tokens": tokens, "rollout_tokens": float(gen.mask.sum()),
            "update_tokens": float(seqs["attention_mask"].sum()), "columns": float(seqs["input_ids"].shape[1]),
            "decode_steps": float(gen.tokens.shape[1]), "text_chars": float(np.mean([len(t) for t in gen.texts])),
            "flops": flops_per_token * tokens}


def ours_grpo(world: World, args: argparse.Namespace, cfg: Any) -> tuple[Callable, Callable]:
    """(step, close) of our GRPO step: ``RLTrainer.collect`` (rollout, scoring, advantages, accuracy filter)
    then ``RLTrainer.update``, timed as the trainer runs them; model FLOPs from ``trainer.flops_per_token``."""
    from specs_jax.training.rl import RLTrainer

    trainer = RLTrainer(cfg, "grpo", world.processor)

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        collected = trainer.collect(world.prompts)
        t1 = time.perf_counter()
        trainer.update(collected.seqs)
        t2 = time.perf_counter()
        return phase_record(t0, t1, t2, collected.metrics["time/score_s"], collected.rollout, collected.seqs,
                            trainer.flops_per_token)

    return step, trainer.close


# --------------------------------------------------------------------------------------------
# PyTorch / transformers sides
# --------------------------------------------------------------------------------------------

def torch_inputs(batch: dict, image_token_id: int, device: str) -> dict:
    import torch

    ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long, device=device)
    kw = {"input_ids": ids,
          "attention_mask": torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long, device=device)}
    if batch.get("pixel_values") is not None:
        kw.update(pixel_values=torch.as_tensor(np.asarray(batch["pixel_values"]), device=device),
                  image_grid_thw=torch.as_tensor(np.asarray(batch["image_grid_thw"]), device=device),
                  mm_token_type_ids=(ids == image_token_id).long())
    return kw


class TorchSide:
    """The transformers model of the world's checkpoint with AdamW/clipping as the run config says,
    and the per-token log-probs and label mask of a batch (label ``t`` is token ``t + 1``)."""

    def __init__(self, world: World, cfg: Any, reference: bool = False):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.world, self.cfg, self.torch = world, cfg, torch
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(world.path, dtype=torch.float32).to(world.device)
        self.model.train()
        self.ref = None
        if reference:
            self.ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(world.path, dtype=torch.float32)
            self.ref = self.ref.to(world.device).eval().requires_grad_(False)
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.image_token_id = world.hf_dict["image_token_id"]

    def autocast(self):
        return self.torch.autocast(self.world.device, dtype=self.torch.bfloat16,
                                   enabled=self.world.dtype == "bfloat16")

    def logps(self, model: Any, kw: dict, temperature: float = 1.0):
        with self.autocast():
            logits = model(**kw).logits[:, :-1].float()
        if temperature != 1.0:
            logits = logits / temperature
        return self.torch.log_softmax(logits, -1).gather(-1, kw["input_ids"][:, 1:, None]).squeeze(-1)

    def inputs(self, batch: dict) -> tuple[dict, Any]:
        kw = torch_inputs(batch, self.image_token_id, self.world.device)
        loss_mask = self.torch.as_tensor(np.asarray(batch["loss_mask"]), device=self.world.device).bool()
        return kw, (loss_mask & kw["attention_mask"].bool())[:, 1:].float()

    def apply(self, loss: Any) -> float:
        loss.backward()
        if self.cfg.optim.max_grad_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def sync(self) -> None:
        if self.world.device == "cuda":
            self.torch.cuda.synchronize()

    def close(self) -> None:
        del self.model, self.ref, self.opt
        gc.collect()
        if self.world.device == "cuda":
            self.torch.cuda.empty_cache()


def torch_supervised(world: World, kind: str, cfg: Any, batch: dict) -> tuple[Callable, Callable]:
    """(step, close) of the eager-PyTorch DPO-hybrid or SFT step."""
    import torch.nn.functional as F

    side = TorchSide(world, cfg, reference=kind == "dpo")
    kwargs = cfg.loss.kwargs
    beta, sft_weight = kwargs.get("beta", 0.1), kwargs.get("sft_weight", 1.0)
    sft_norm, smoothing = kwargs.get("sft_norm", "token"), kwargs.get("label_smoothing", 0.0)
    tokens = float(np.asarray(batch["attention_mask"]).sum())

    def loss_fn(kw, mask):
        logp = side.logps(side.model, kw)
        if kind == "sft":
            return (-(logp * mask).sum()) / mask.sum().clamp(min=1)
        with side.torch.no_grad():
            ref = (side.logps(side.ref, kw) * mask).sum(1)
        pi, b = (logp * mask).sum(1), len(mask) // 2
        h = (pi[:b] - ref[:b]) - (pi[b:] - ref[b:])
        dpo = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
        n = mask[:b].sum(1)
        nll = -pi[:b].sum() / n.sum().clamp(min=1) if sft_norm == "token" else (-pi[:b] / n.clamp(min=1)).mean()
        return dpo.mean() + sft_weight * nll

    def step() -> dict[str, float]:
        start = time.perf_counter()
        loss = side.apply(loss_fn(*side.inputs(batch)))
        side.sync()
        return {"step": time.perf_counter() - start, "loss": loss, "tokens": tokens,
                "flops": (8 if kind == "dpo" else 6) * world.n_matmul * tokens}

    return step, side.close


class HFSampler:
    """The sampler interface that :func:`specs_jax.training.grpo.rollout` calls, over transformers'
    ``generate``: prompts trimmed to their longest row (left padding kept), ``n`` samples per prompt,
    log-probs of the sampled tokens from the processed generation scores (``logits / T``); the image
    and video placeholders are never sampled (as in :class:`~specs_jax.sampling.Sampler`)."""

    def __init__(self, side: TorchSide, max_new_tokens: int):
        self.side, self.max_new_tokens = side, max_new_tokens
        self.tokenizer = side.world.processor.tokenizer
        self.eos_id, self.pad_id = side.world.hf_dict["eos_token_id"], side.world.hf_dict["pad_token_id"]
        self.never = [side.world.hf_dict["image_token_id"], side.world.hf_dict["video_token_id"]]  # as our sampler

    def generate_ids(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *, n=1,
                     params=None, seed=0, weights=None):
        from specs_jax.sampling import Generation

        torch = self.side.torch
        mask = np.asarray(attention_mask).astype(bool)
        keep = mask.any(0)
        ids, mask = np.asarray(input_ids)[:, keep], mask[:, keep]
        kw = torch_inputs({"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
                           "image_grid_thw": image_grid_thw}, self.side.image_token_id, self.side.world.device)
        torch.manual_seed(seed)
        model = self.side.model
        model.eval()
        with torch.no_grad(), self.side.autocast():
            out = model.generate(**kw, do_sample=params.temperature > 0, temperature=params.temperature or None,
                                 top_k=params.top_k, top_p=params.top_p, max_new_tokens=self.max_new_tokens,
                                 num_return_sequences=n, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                 suppress_tokens=self.never, output_scores=True, return_dict_in_generate=True)
        model.train()
        tokens = out.sequences[:, ids.shape[1]:]
        logps = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, tokens[:, i:i + 1])[:, 0]
                             for i, s in enumerate(out.scores)], 1)
        tokens, logps = tokens.cpu().numpy().astype(np.int32), logps.cpu().numpy()
        eos = tokens == self.eos_id
        done = (np.cumsum(eos, 1) - eos) > 0  # after the first EOS
        gen_mask = ~done
        texts = [self.tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(tokens, gen_mask)]
        return Generation(np.where(gen_mask, tokens, self.pad_id), logps, gen_mask, texts, None,
                          np.repeat(ids, n, 0), np.repeat(mask, n, 0))


def torch_grpo(world: World, args: argparse.Namespace, cfg: Any) -> tuple[Callable, Callable]:
    """(step, close) of the reference GRPO step: generate -> the same scoring -> torch update (model FLOPs
    counted as ours: 2N per token for the rollout's forward + 6N for the update)."""
    from specs_jax.model import from_hf_dict
    from specs_jax.rewards import score_batch
    from specs_jax.sampling import SamplingParams
    from specs_jax.training.grpo import rollout, rollout_sequences

    kwargs = cfg.loss.kwargs
    if kwargs.get("kl_coef", 0.01) != 0 or kwargs.get("loss_agg", "token-mean") != "token-mean" or \
            kwargs.get("dual_clip") is not None:
        raise NotImplementedError(f"the torch GRPO reference implements kl_coef 0, token-mean, no dual clip; "
                                  f"got loss.kwargs {kwargs}")
    eps_low, eps_high = kwargs.get("eps_low", 0.2), kwargs.get("eps_high", 0.28)
    rl = cfg.rl
    side = TorchSide(world, cfg)
    sampler = HFSampler(side, rl.max_new_tokens)
    sampling = SamplingParams(temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p)
    torch = side.torch

    def update(seqs: dict) -> float:
        kw, mask = side.inputs(seqs)
        logp = side.logps(side.model, kw, rl.temperature)
        old = torch.tensor(np.asarray(seqs["old_logps"])[:, :-1], device=world.device)
        adv = torch.tensor(np.asarray(seqs["advantages"]), device=world.device)[:, None]
        ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
        loss = side.apply((pg * mask).sum() / mask.sum().clamp(min=1))
        side.sync()
        return loss

    model_cfg = from_hf_dict(world.hf_dict)
    seeds = iter(range(1, 1 << 30))

    def step() -> dict[str, float]:
        scoring = {}

        def reward(gen, answers):
            start = time.perf_counter()
            scores = score_batch(gen.texts, answers)
            scoring["s"] = time.perf_counter() - start
            return scores.total

        t0 = time.perf_counter()
        ro = rollout(sampler, world.prompts, group_size=rl.group_size, params=sampling, seed=next(seeds),
                     reward_fn=reward, scale=rl.scale_rewards or "group")
        seqs = rollout_sequences(model_cfg, world.prompts, ro, rl.group_size)
        t1 = time.perf_counter()
        update(seqs)
        t2 = time.perf_counter()
        return phase_record(t0, t1, t2, scoring["s"], ro, seqs, 8 * world.n_matmul)

    return step, side.close


# --------------------------------------------------------------------------------------------
# measurement and report
# --------------------------------------------------------------------------------------------

def measure(factories: dict[str, Callable[[], tuple[Callable, Callable]]], steps: int,
            interleave: bool) -> dict[str, dict[str, Any]]:
    """Per side: ``first`` (the warm-up step's record) and ``runs`` (the timed steps' records).
    Interleaved: all sides built, then warmed up, then stepped in turn; else one side after another,
    each closed before the next is built."""
    out: dict[str, dict[str, Any]] = {}
    if interleave:
        built = {name: make() for name, make in factories.items()}
        for name, (step, _) in built.items():
            out[name] = {"first": step(), "runs": []}
        for _ in range(steps):
            for name, (step, _) in built.items():
                out[name]["runs"].append(step())
        for _, close in built.values():
            close()
    else:
        for name, make in factories.items():
            step, close = make()
            out[name] = {"first": step(), "runs": [step() for _ in range(steps)]}
            close()
            gc.collect()
    return out


def median(result: dict[str, Any] | None, key: str) -> float | None:
    if result is None:
        return None
    return statistics.median(r[key] for r in result["runs"])


def phase_sum(result: dict[str, Any]) -> float:
    """Sum of the median phase times of a GRPO side (the denominator of the phase shares)."""
    return sum(median(result, phase) for phase in ("rollout", "score", "update"))


class Table:
    COLS = f"{'':22} | {'specs-jax s':>11} {'steps/s':>8} {'tokens/s':>9} | {'torch s':>9} {'steps/s':>8} " \
           f"{'tokens/s':>9} | {'speed ours/torch':>16}"

    def __init__(self):
        print(self.COLS)
        print("-" * len(self.COLS))

    @staticmethod
    def _side(seconds: float | None, tokens: float | None, width: int) -> str:
        if seconds is None:
            return f"{'-':>{width}} {'-':>8} {'-':>9}"
        return f"{seconds:>{width}.3f} {1 / seconds:>8.2f} {tokens / seconds:>9.0f}"

    def row(self, label: str, res: dict, time_key: str = "step", token_key: str = "tokens", extra: str = "") -> None:
        ours, ref = res.get("specs-jax"), res.get("torch")
        a, b = median(ours, time_key), median(ref, time_key)
        ratio = f"{b / a:>15.2f}x" if a and b else f"{'-':>16}"
        print(f"{label:22} | {self._side(a, median(ours, token_key), 11)} | "
              f"{self._side(b, median(ref, token_key), 9)} | {ratio}{extra}")


def report(world: World, args: argparse.Namespace, results: dict[str, dict], interleave: bool) -> None:
    import jax
    import torch

    from specs_jax.training.logging import peak_flops_per_device

    shape = world.shape
    batch, seq = args.batch or shape.batch, args.seq_len or shape.seq_len
    group, new = args.group_size or shape.group_size, args.max_new_tokens or shape.max_new_tokens
    steps = args.steps or shape.steps
    print(f"\n== {world.name}: {world.n_params / 1e6:.1f}M parameters ({world.n_matmul / 1e6:.1f}M decoder + LM-head "
          f"matmul) ==")
    print(shape.describe(world.hf_dict["vocab_size"]))
    print(f"{world.dtype} compute; JAX on {jax.devices()[0].platform} ({jax.device_count()} device(s)), torch on "
          f"{world.device} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); median of {steps} steps after 1 warm-up, sides "
          f"{'alternating step by step' if interleave else 'one after the other'}")
    print(f"workload: DPO-hybrid {batch} pairs x {seq} tokens, SFT {batch} rows x {seq} tokens, GRPO {batch} prompts x "
          f"{group} samples x {new} new tokens (prompts <= {PROMPT_BUCKET} tokens)")
    table = Table()
    if "dpo" in results:
        table.row("DPO-hybrid step", results["dpo"])
    if "sft" in results:
        table.row("SFT step", results["sft"])
    grpo = results.get("grpo")
    if grpo:
        table.row("GRPO step", grpo)
        for phase, label, tokens in (("rollout", "  rollout (sampling)", "rollout_tokens"),
                                     ("score", "  scoring (rewards)", "rollout_tokens"),
                                     ("update", "  update (opt. step)", "update_tokens")):
            shares = "; share " + ", ".join(f"{side} {median(r, phase) / phase_sum(r):.0%}" for side, r in grpo.items())
            table.row(label, grpo, phase, tokens, shares)
        for side, r in grpo.items():
            print(f"GRPO {side}: {median(r, 'decode_steps'):.0f} decode steps, update rows of "
                  f"{median(r, 'columns'):.0f} columns, decoded texts of {median(r, 'text_chars'):.0f} chars on average")
    firsts = [f"{kind} {res['specs-jax']['first']['step']:.1f} s" for kind, res in results.items() if "specs-jax" in res]
    print("specs-jax first step incl. compilation: " + ", ".join(firsts))
    checks = [f"{kind} specs-jax {res['specs-jax']['first']['loss']:.6f} torch {res['torch']['first']['loss']:.6f}"
              for kind, res in results.items() if kind != "grpo" and len(res) == 2]
    if checks:
        print("loss check (first step, same weights and batch): " + "; ".join(checks))
    if grpo and "specs-jax" in grpo:
        from bench_rewards import make_batch

        from specs_jax.rewards import score_batch

        rows = batch * group
        texts, truths = make_batch(rows, seed=0, group=group)
        start = time.perf_counter()
        score_batch(texts, truths)
        seconds = time.perf_counter() - start
        ours = grpo["specs-jax"]
        share = seconds / (median(ours, "step") - median(ours, "score") + seconds)
        print(f"scoring {rows} realistic responses instead (scripts/bench_rewards.py texts, mean "
              f"{np.mean([len(t) for t in texts]):.0f} chars): {seconds:.3f} s, {share:.0%} of the specs-jax step")
    peak = peak_flops_per_device()
    if peak is None:
        print("MFU: n/a on CPU")
        return
    parts = []
    for kind, label in (("dpo", "DPO-hybrid step"), ("sft", "SFT step"), ("grpo", "GRPO step")):
        for side, r in results.get(kind, {}).items():
            seconds = median(r, "step")
            devices = jax.device_count() if side == "specs-jax" else 1
            parts.append(f"{label} {side} {median(r, 'flops') / seconds / (peak * devices):.1%}")
    print(f"MFU (model FLOPs of the trainer's count: 6N/token per update + 2N per extra or rollout forward, peak {peak / 1e12:.0f} TFLOP/s bf16 per device): "
          + ", ".join(parts))


def bench_config(name: str, args: argparse.Namespace, kinds: list[str], stages: tuple[Any, Any]) -> None:
    import jax

    dpo_stage, grpo_stage = stages
    shape = SHAPES[name]
    world = build_world(name, shape, args, grpo_stage.data.system_prompt)
    interleave = not args.sequential and jax.devices()[0].platform == "cpu"
    steps = args.steps or shape.steps
    results: dict[str, dict] = {}
    for kind in kinds:
        if kind in ("dpo", "sft"):
            cfg = run_config(world, args, kind, dpo_stage)
            batch = synthetic_batch(world, args, kind)
            factories = {"specs-jax": lambda: ours_supervised(world, args, kind, cfg, batch)}
            if not args.skip_torch:
                factories["torch"] = lambda: torch_supervised(world, kind, cfg, batch)
        else:
            cfg = run_config(world, args, kind, grpo_stage)
            factories = {"specs-jax": lambda: ours_grpo(world, args, cfg)}
            if not args.skip_torch:
                factories["torch"] = lambda: torch_grpo(world, args, cfg)
        start = time.perf_counter()
        results[kind] = measure(factories, steps, interleave)
        print(f"[{name}] {kind}: measured in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    report(world, args, results, interleave)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,100m",
                   help=f"comma-separated model shapes among {', '.join(SHAPES)} (default: tiny,100m)")
    p.add_argument("--kinds", default="dpo,sft,grpo", help="steps to time among dpo, sft, grpo (default: all)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per side after the warm-up (default per config: tiny 10, 100m 3, 1b 5)")
    p.add_argument("--batch", type=int, default=None,
                   help="DPO pairs, SFT rows and GRPO prompts per step (default per config: tiny 4, 100m 2, 1b 4)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="DPO/SFT row length in tokens (default per config: tiny 64, 100m 128, 1b 1024)")
    p.add_argument("--group-size", type=int, default=None,
                   help="GRPO samples per prompt (default per config: tiny 4, 100m 4, 1b 8)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="GRPO rollout length (default per config: tiny 64, 100m 32, 1b 256)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype of both sides (auto: float32 on CPU, bfloat16 on an accelerator; "
                        "master weights float32)")
    p.add_argument("--skip-torch", action="store_true", help="time specs-jax only (no ratios, no loss check)")
    p.add_argument("--sequential", action="store_true",
                   help="run the sides one after the other (the default on accelerators) instead of alternating "
                        "steps (the default on CPU)")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [c for c in args.configs if c not in SHAPES] + [k for k in args.kinds if k not in ("dpo", "sft", "grpo")]
    if bad:
        p.error(f"unknown config(s)/kind(s) {bad}; configs: {list(SHAPES)}, kinds: dpo, sft, grpo")
    for key in ("steps", "batch", "seq_len", "group_size", "max_new_tokens"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_rewards
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares an accelerator with JAX
    # OpenMP threads that spin-wait turn torch's CPU steps 3-60x slower on a machine shared with other
    # jobs (measured here: 2 threads on 2 loaded cores); sleeping waits cost nothing on an idle machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import transformers

    transformers.logging.set_verbosity_error()
    stages = stage_settings()
    for name in args.configs:
        bench_config(name, args, args.kinds, stages)


if __name__ == "__main__":
    main()

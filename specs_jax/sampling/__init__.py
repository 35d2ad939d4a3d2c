"""JAX rollout sampler: a rollout engine (per-prompt prefill, decode slots under a KV-cache budget, continuous
batching) with M-RoPE, sampling controls and log-probs."""

from specs_jax.sampling.engine import Rollout, choose_slots, engine_rollout, kv_bytes_per_token, sample_keys
from specs_jax.sampling.sample import SamplingParams, filter_logits, sample_tokens
from specs_jax.sampling.sampler import Generation, Sampler, SamplerConfig

__all__ = ["Generation", "Rollout", "Sampler", "SamplerConfig", "SamplingParams", "choose_slots", "engine_rollout",
           "filter_logits", "kv_bytes_per_token", "sample_keys", "sample_tokens"]

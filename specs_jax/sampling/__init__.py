"""JAX rollout sampler: KV-cached prefill + jitted decode loop with M-RoPE, sampling controls and log-probs."""

from specs_jax.sampling.sample import SamplingParams, filter_logits, sample_tokens
from specs_jax.sampling.sampler import Generation, Rollout, Sampler, SamplerConfig, generate_rollout

__all__ = ["Generation", "Rollout", "Sampler", "SamplerConfig", "SamplingParams", "filter_logits",
           "generate_rollout", "sample_tokens"]

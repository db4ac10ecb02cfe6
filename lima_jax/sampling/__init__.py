"""Sampling: decoding transforms, the KV-cache prefill + decode loop, batch answering."""

from lima_jax.sampling.generate import cache_logical_axes, generate, init_cache
from lima_jax.sampling.transforms import SamplingSettings, next_token, repetition_penalty, temperature, top_k, top_p

__all__ = ["SamplingSettings", "cache_logical_axes", "generate", "init_cache", "next_token", "repetition_penalty",
           "temperature", "top_k", "top_p"]

"""Sampling: LIMA's decoding settings and transforms (decoding.py), the one decode step with
continuous batching (decode.py), the Sampler and answers files (sampler.py, answers.py), the
streaming detokenizer (text.py)."""

from lima_jax.sampling.decoding import LIMA, SamplingSettings

__all__ = ["LIMA", "SamplingSettings"]

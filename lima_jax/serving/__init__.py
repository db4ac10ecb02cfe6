"""Serving: a batching engine over the sampler (fixed slots, continuous batching, one jitted
decode step) and the ASGI app that speaks OpenAI's API over it.

Imports are lazy: `lima_jax.serving.engine` needs JAX only, `lima_jax.serving.app` needs
FastAPI (the `serve` extra)."""

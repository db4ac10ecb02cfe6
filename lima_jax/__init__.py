"""lima_jax: LIMA supervised fine-tuning of LLaMA in JAX/Flax on TPU pods."""

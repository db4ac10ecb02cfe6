"""Speed settings that only one backend wants, chosen here per backend: the rest of the code asks.

`platform` is a JAX platform name ("cpu", "gpu" or its "cuda"/"rocm" spellings, "tpu"); None
means the target of the program being traced: the platform of the mesh set by `jax.set_mesh`
(so the AOT fit check, which traces for a TPU topology on a CPU host, gets TPU's settings),
else the running backend. The measurements behind each value are in docs/benchmarks.md.

- `tuning(platform)`: what the model reads at trace time where its config leaves a setting None
  (`ModelConfig.for_platform` fills them for a given platform).
- `compiler_options(platform)`: the XLA options to jit the train step with.
- `compile_step(jitted, *args)`: compile ahead of time, then hand the compiler's memory back.
"""

import dataclasses

import jax

from lima_jax import hostmem


@dataclasses.dataclass(frozen=True)
class Tuning:
    transposed_wgrad: bool  # weight gradients read a transposed copy of their input (model/dense.py)
    causal_blocks: int  # training's causal xla attention cuts the queries into this many blocks; 1 = none
    kv_position_major: bool  # the KV cache is [L, B, T, KV, D], else head-major [L, B, KV, T, D] (model/kv_cache.py)
    compiler_options: tuple[tuple[str, str], ...] = ()  # XLA options of the train step, as (name, value)


# One entry per backend; each value's why in one line.
TUNINGS = {
    "cpu": Tuning(
        # XLA:CPU sends x^T @ dy to its fast matmul library only from a transposed copy: step 4-5% faster.
        transposed_wgrad=True,
        # Skips 3/8 of the score work (all masked); bench-110m step 12% faster than with 8 blocks, 3% than 2.
        causal_blocks=4,
        # Attention reads a head-major layer in place; position-major, decode at batch 4 over 1,024 positions 1.5x slower.
        kv_position_major=False,
        # Orders the backward pass so activations die early: bench-110m temporaries 5.68 -> 4.09 GiB.
        compiler_options=(("xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"),),
    ),
    "gpu": Tuning(
        # GPU matmuls take any operand order at full speed; the copy would only add memory traffic.
        transposed_wgrad=False,
        # Every H200 figure has them (8 -> 4 came with a 10% faster xla-attention step); none-vs-4 not measured.
        causal_blocks=4,
        # TPU's layout, kept since it became the only one; head-major not measured on a GPU.
        kv_position_major=True,
    ),
    "tpu": Tuning(
        # The MXU takes any operand order at full speed; the copy would only add memory traffic.
        transposed_wgrad=False,
        # Exact, 3/8 of the score work skipped in 512-row blocks at S = 2048; the 65B fit was compiled with them.
        causal_blocks=4,
        # The decode loop's own layout; head-major was copied whole in and out each step (65B v5p-8: 20.6 GiB temps).
        kv_position_major=True,
    ),
}
ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def target_platform() -> str:
    """The platform of the mesh being traced for (`jax.set_mesh`), else the running backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def platform_name(platform: str | None = None) -> str:
    """The TUNINGS key of `platform` (None: `target_platform()`)."""
    name = (platform or target_platform()).lower()
    name = ALIASES.get(name, name)
    if name not in TUNINGS:
        raise ValueError(f"no tuning for the JAX platform {platform!r}; known: {sorted(TUNINGS)}")
    return name


def tuning(platform: str | None = None) -> Tuning:
    """The speed settings of `platform` (None: the target of the program being traced)."""
    return TUNINGS[platform_name(platform)]


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """XLA options for jitting the train step on `platform` (None: `target_platform()`), or None
    where that backend keeps its defaults (`jax.jit(..., compiler_options=...)` takes either)."""
    return dict(tuning(platform).compiler_options) or None


def compile_step(jitted: jax.stages.Wrapped, *args) -> jax.stages.Compiled:
    """`jitted` compiled ahead of time for these arguments, then the compiler's freed working
    memory handed back to the OS: glibc keeps it otherwise, under the first step's buffers."""
    compiled = jitted.lower(*args).compile()
    hostmem.return_freed_memory()
    return compiled

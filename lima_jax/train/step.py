"""The train step: a pure function (state, batch, key) -> (state, metrics), jitted with
explicit shardings and a donated state by the loop.

Gradients are taken of the summed token loss and divided once by the step's number of
target tokens, so gradient accumulation gives the same update as one large batch and every
target token weighs the same however the examples were packed.

With LoRA (`lora` given), `params` are the adapters, the only tree differentiated and
optimized; the frozen base rides in the state as `base` and is returned untouched.

With the optimizer state in host memory (`opt_state_memory="pinned_host"`), it waits there
between steps and through the forward and backward passes; the update brings it to the device,
updates it there and writes it back. Its HBM is then shared with the activations, which are gone
by the update, instead of added to them (the compiler schedules the copies: on the 65B
step it keeps the whole state on the device during the update, docs/benchmarks.md). The
arithmetic is the device's either way: only where the moments wait changes.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lima_jax.model import abstract_params, lora as lora_lib, param_logical_axes
from lima_jax.sharding import constrain, in_memory, named_shardings
from lima_jax.train import loss as loss_lib


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # what the optimizer updates: the model, or the LoRA adapters
    opt_state: optax.OptState
    base: dict | None = None  # LoRA: the frozen base (never differentiated); None in full fine-tuning


def abstract_train_state(model_cfg, optimizer, mesh: Mesh, lora: lora_lib.LoraConfig | None = None,
                         opt_state_memory: str = "device") -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStructs, shardings) of the train state: the optimizer moments follow their
    parameters' shardings; optimizer scalars (counts) are replicated; the whole optimizer state
    lives in memory `opt_state_memory` (sharding.MEMORY_KINDS)."""
    if lora is None:
        params, base, base_shardings = abstract_params(model_cfg), None, None
        param_shardings = named_shardings(param_logical_axes(model_cfg), mesh)
    else:
        params, param_shardings = (lora_lib.abstract_adapters(model_cfg, lora),
                                   lora_lib.adapter_shardings(model_cfg, lora, mesh))
        base = lora_lib.abstract_base(model_cfg, lora)
        base_shardings = named_shardings(lora_lib.base_logical_axes(model_cfg, lora), mesh)
    replicated = NamedSharding(mesh, P())
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_shardings,
                                          transform_non_params=lambda _: replicated)
    opt_shardings = in_memory(opt_shardings, opt_state_memory)
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state, base)
    return abstract, TrainState(replicated, param_shardings, opt_shardings, base_shardings)


def model_params(params: dict, base: dict | None, lora: lora_lib.LoraConfig | None,
                 dropout_key: jax.Array | None = None) -> dict:
    """The weights the model runs on: `params` itself, or under LoRA the base with the adapters attached."""
    return params if lora is None else lora_lib.attach(base, params, lora, dropout_key)


def make_train_step(model_cfg, optimizer: optax.GradientTransformation, schedule, grad_accum_steps: int = 1,
                    lora: lora_lib.LoraConfig | None = None, opt_state_memory: str = "device"):
    def summed_loss(params, batch, key, base):
        _, (total, count) = loss_lib.lm_loss(model_cfg, model_params(params, base, lora, key), batch, key)
        return total, count

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def gradients(params, batch, key, base):
        """(summed loss, target tokens, summed gradients) over the whole batch."""
        if grad_accum_steps == 1:
            (total, count), grads = grad_fn(params, batch, key, base)
            return total, count, grads

        # Micro-batch a takes rows a, a + A, a + 2A, ...: every device keeps working on its rows.
        def split(x):
            x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)
            return constrain(x, None, "batch", "length")

        def accumulate(carry, xs):
            micro, index = xs
            (total, count), grads = grad_fn(params, micro, jax.random.fold_in(key, index), base)
            return jax.tree.map(jnp.add, carry, (total, count, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        carry, _ = jax.lax.scan(accumulate, zeros, (jax.tree.map(split, batch), jnp.arange(grad_accum_steps)))
        return carry

    def train_step(state: TrainState, batch: dict, dropout_key: jax.Array):
        total, count, grads = gradients(state.params, batch, jax.random.fold_in(dropout_key, state.step), state.base)
        count = jnp.maximum(count, 1.0)
        loss = total / count
        grads = jax.tree.map(lambda g: g / count, grads)
        # A non-finite loss leaves the state as it was; the loop sees the loss and stops, so
        # the last good checkpoint stays the newest. A cond rather than a select of old and new
        # values: the update runs in place on the donated state and nothing reads all of the
        # parameters and moments a second time (bench-110m on CPU: 2.6% of the step).
        finite = jnp.isfinite(loss)

        def update(params, opt_state, grads):
            opt_state = to_memory(opt_state, jax.memory.Space.Device)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), to_memory(opt_state, jax.memory.Space.Host)

        def to_memory(tree, space):  # a copy a leaf; nothing to copy when the state lives on the device
            return tree if opt_state_memory == "device" else jax.tree.map(lambda x: jax.device_put(x, space), tree)

        params, opt_state = jax.lax.cond(finite, update, lambda params, opt_state, _: (params, opt_state),
                                         state.params, state.opt_state, grads)
        new_state = TrainState(state.step + finite.astype(state.step.dtype), params, opt_state, state.base)
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step),
                       target_tokens=count, real_tokens=jnp.sum(batch["segment_ids"] > 0))
        return new_state, metrics

    return train_step


def make_eval_step(model_cfg, lora: lora_lib.LoraConfig | None = None):
    """(summed loss, target tokens) of a batch without dropout: dev loss and perplexity.
    `base`: the frozen base under LoRA (then `params` are the adapters), else None."""

    def eval_step(params, batch, base=None):
        _, (total, count) = loss_lib.lm_loss(model_cfg, model_params(params, base, lora), batch)
        return total, count

    return eval_step

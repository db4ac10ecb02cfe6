"""The train program, built once for the loop, the AOT fit check and the benchmarks: optimizer
and schedule, the abstract train state and its shardings, the jitted train and eval steps,
and the abstract batch they are compiled for."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lima_jax.backend import compiler_options
from lima_jax.data.pipeline import FEATURES, batch_sharding
from lima_jax.model import ModelConfig, lora as lora_lib
from lima_jax.run_config import RunConfig
from lima_jax.sharding import BatchLayout, batch_layout, check_memory_kind, num_slices, resolve_mesh_shape
from lima_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lima_jax.train.step import TrainState, abstract_train_state, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    model_cfg: ModelConfig
    lora: lora_lib.LoraConfig | None  # None: full fine-tuning
    mesh: Mesh
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs
    state_shardings: TrainState
    batch_sharding: NamedSharding
    train_step: jax.stages.Wrapped  # (state, batch, dropout_key) -> (state, metrics); donates the state
    eval_step: jax.stages.Wrapped  # (params, batch, base) -> (summed loss, target tokens); base None unless LoRA

    def abstract_batch(self, rows: int, seq_len: int) -> dict:
        """The batch the steps are compiled for: [rows, seq_len] of each feature."""
        return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k == "loss_weights" else jnp.int32,
                                        sharding=self.batch_sharding) for k in FEATURES}

    def abstract_args(self, rows: int, seq_len: int) -> tuple:
        """(state, batch, key) as ShapeDtypeStructs with shardings: `train_step.lower(*...)`."""
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract_state, self.state_shardings)
        key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype  # abstract: no device runs anything
        key = jax.ShapeDtypeStruct((), key_dtype, sharding=self.state_shardings.step)
        return state, self.abstract_batch(rows, seq_len), key


def build_program(run: RunConfig, mesh: Mesh, total_steps: int) -> TrainProgram:
    model_cfg, lora, opt_state_memory = run.model, run.lora, run.train.opt_state_memory
    schedule = learning_rate_schedule(run.optimizer, total_steps)
    optimizer = make_optimizer(run.optimizer, schedule)
    check_memory_kind(mesh.devices.flat, opt_state_memory, "train.opt_state_memory")
    abstract_state, state_shardings = abstract_train_state(model_cfg, optimizer, mesh, lora, opt_state_memory)
    batch = batch_sharding(mesh)
    replicated = state_shardings.step
    train_step = jax.jit(make_train_step(model_cfg, optimizer, schedule, run.train.grad_accum_steps, lora,
                                         opt_state_memory),
                         in_shardings=(state_shardings, batch, replicated), out_shardings=(state_shardings, replicated),
                         donate_argnums=0, compiler_options=compiler_options(mesh.devices.flat[0].platform))
    eval_step = jax.jit(make_eval_step(model_cfg, lora), in_shardings=(state_shardings.params, batch,
                                                                       state_shardings.base))
    return TrainProgram(model_cfg, lora, mesh, optimizer, schedule, abstract_state, state_shardings, batch, train_step,
                        eval_step)


def batch_layout_for(run: RunConfig, rows_needed: int, devices) -> BatchLayout:
    """The step's rows and how they lie over `devices` (see sharding.batch_layout). Only the
    xla attention takes sequences split over devices (splash and cuDNN see whole rows)."""
    ici, dcn = resolve_mesh_shape(run.mesh, len(devices), num_slices(devices))
    batch_shards = ici[0] * ici[1] * dcn[0] * dcn[1]
    return batch_layout(rows_needed, run.train.grad_accum_steps, batch_shards, ici[1], run.data.seq_len,
                        fixed_rows=run.data.rows_per_step, allow_context=run.model.attention == "xla")


def bucket_rows(layout: BatchLayout, buckets) -> tuple[int, ...]:
    """The rows of the plan's buckets (rows needed, the largest last) as laid out: the largest is
    `layout.rows`, the others are rounded up to a multiple of its row shards x micro-batches, so
    every step shape runs on the same mesh."""
    unit = layout.row_shards * layout.grad_accum_steps
    return tuple(sorted({min(-(-b // unit) * unit, layout.rows) for b in buckets[:-1]} | {layout.rows}))

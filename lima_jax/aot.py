"""Ahead-of-time fit check: compile the real train step for a TPU topology on any machine.

With `libtpu` installed, `jax.experimental.topologies` describes a TPU slice without TPUs;
the step is lowered with the config's mesh and shardings and compiled by the TPU compiler,
which reports per-device memory (or fails with RESOURCE_EXHAUSTED when it does not fit).
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding

from lima_jax import config as config_lib
from lima_jax.model import abstract_params, flops_per_token, param_logical_axes
from lima_jax.run_config import RunConfig
from lima_jax.sharding import logical_to_spec, make_mesh, named_shardings
from lima_jax.train.program import batch_layout_for, bucket_rows, build_program

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    topology: str  # prefix of get_topology_desc's topology_name
    cores_per_chip_in_name: int  # v4/v5p slice names count TensorCores (2 a chip), v5e/v6e count chips
    hbm_bytes: int  # per JAX device (a megacore chip for v4/v5p)
    dims: int
    megacore: bool


CHIPS = {
    "v4": Chip("v4", 2, 32 * GiB, 3, True),
    "v5p": Chip("v5p", 2, 95 * GiB, 3, True),
    "v5e": Chip("v5e", 1, 16 * GiB, 2, False),
    "v6e": Chip("v6e", 1, 32 * GiB, 2, False),
}


def parse_topology(name: str) -> tuple[Chip, int, str]:
    """'v4-128' -> (chip, 64 chips, '4x4x4'): the slice shape Google Cloud builds for that name."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if not m:
        raise ValueError(f"--topology={name!r}: expected v4-N, v5p-N, v5e-N or v6e-N (e.g. v4-128)")
    chip = CHIPS[m.group(1)]
    n = int(m.group(2))
    chips, rem = divmod(n, chip.cores_per_chip_in_name)
    if rem or chips < 1 or chips & (chips - 1):
        raise ValueError(f"--topology={name!r}: {n} is not a slice size of {m.group(1)} (powers of two)")
    if chip.dims == 3 and chips < 4:
        raise ValueError(f"--topology={name!r}: the smallest {m.group(1)} slice is {m.group(1)}-8")
    # Cloud TPU slices grow by doubling the last of their smallest axes: 2x2x1, 2x2x2, 2x2x4,
    # 2x4x4, 4x4x4, 4x4x8, ... (3-D) and 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ... (2-D).
    shape = [2, 2, 1] if chip.dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, a in enumerate(shape) if a == smallest)] *= 2
    return chip, chips, "x".join(map(str, shape))


def topology_devices(name: str, num_slices: int = 1):
    chip, _, shape = parse_topology(name)
    kwargs = dict(topology_name=f"{chip.topology}:{shape}", platform="tpu", num_slices=num_slices)
    if chip.megacore:
        kwargs["chip_config_name"] = "megacore"
    return chip, topologies.get_topology_desc(**kwargs).devices


def rows_needed(config: RunConfig) -> tuple[tuple[int, ...], str]:
    """(the rows of each bucket's packing, the fullest step's last; where they come from): the
    plan of the configured data when `data.train_path` is set, else one example a row, the most
    a step of `examples_per_step` examples can need."""
    if not config.data.train_path:
        return (config.data.examples_per_step,), "one example a row (no data.train_path: the most a step can need)"
    from lima_jax.data import pipeline

    data = pipeline.load_data(config.data, config.seed)
    plan = pipeline.make_plan(data, config.data.examples_per_step, config.train.epochs, config.data.grouping,
                              config.data.row_buckets)
    return plan.buckets, (f"the plan of {config.data.train_path} ({plan.total_steps} steps, {plan.grouping} "
                          f"grouping: {plan.describe_rows()}, {100 * plan.efficiency:.1f}% real tokens)")


def check_train_step(config, topology: str, num_slices: int = 1) -> dict:
    """Compile the train step the loop would run on `topology` (same program builder, same
    batch layout); returns the memory/FLOPs report (raises when the compiler finds no fit)."""
    chip, devices = topology_devices(topology, num_slices)
    config = config_lib.validate(config, len(devices), num_slices)
    model_cfg = config.model
    buckets, why = rows_needed(config)
    layout = batch_layout_for(config, buckets[-1], devices)
    mesh = make_mesh(config.mesh, devices, context=layout.context)
    program = build_program(config, mesh, total_steps=1000)
    seq, shapes = config.data.seq_len, bucket_rows(layout, buckets)
    with jax.set_mesh(mesh):  # every step shape the run compiles; the report is the largest's
        reports = [report(program.train_step.lower(*program.abstract_args(rows, seq)).compile(), chip, devices)
                   for rows in shapes]
    return dict(max(reports, key=lambda r: r["total_gib"]), step="train", topology=topology, num_slices=num_slices,
                mesh=dict(mesh.shape), rows=layout.rows, shapes=shapes, seq_len=seq, remat_policy=model_cfg.remat_policy,
                opt_state_memory=config.train.opt_state_memory,
                attention=model_cfg.attention, layout=layout.describe(seq), rows_from=why,
                model_flops_per_step=flops_per_token(model_cfg, seq, program.lora) * layout.rows * seq)


def check_decode_step(config, topology: str, num_slices: int = 1, num_slots: int | None = None) -> dict:
    """Compile the decode step serve.py runs (sampling.decode.decode_step: one token for each of
    `num_slots` slots, default serve.py's, rounded up to the batch shards, over a cache of the
    model's whole context), with LIMA's decoding. A LoRA config decodes as load_sampler does:
    the frozen base as training holds it (`lora.base_dtype`, int8 included) with the adapters
    beside it, unmerged."""
    from lima_jax.model import lora as lora_lib
    from lima_jax.sampling.decode import DEFAULT_SLOTS, batch_multiple, cache_logical_axes, decode_step, init_slots

    chip, devices, model_cfg, mesh = target(config, topology, num_slices)
    group = batch_multiple(mesh)
    slots = math.ceil((num_slots or DEFAULT_SLOTS) / group) * group
    length = model_cfg.max_seq_len
    on_mesh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    lora = config_lib.lora_config(config)
    if lora is None:
        params = jax.tree.map(on_mesh, abstract_params(model_cfg), named_shardings(param_logical_axes(model_cfg), mesh))
        weights = lambda params: params  # noqa: E731
    else:
        base = jax.tree.map(on_mesh, lora_lib.abstract_base(model_cfg, lora),
                            named_shardings(lora_lib.base_logical_axes(model_cfg, lora), mesh))
        adapters = jax.tree.map(on_mesh, lora_lib.abstract_adapters(model_cfg, lora),
                                lora_lib.adapter_shardings(model_cfg, lora, mesh))
        params, weights = (base, adapters), lambda params: lora_lib.attach(*params, lora)  # an adapted head: merged
    step = jax.jit(lambda params, state, active: decode_step(model_cfg, weights(params), state, active),
                   donate_argnums=1)
    replicated = NamedSharding(mesh, logical_to_spec(()))
    active = jax.ShapeDtypeStruct((slots,), jnp.bool_, sharding=replicated)
    with jax.set_mesh(mesh):  # the cache's layout is the target's (model.kv_cache.Layout), not this host's
        cache = named_shardings(cache_logical_axes(model_cfg), mesh)
        state = jax.eval_shape(init_slots, model_cfg, slots, length)
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
        state["cache"] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      state["cache"], cache)
        compiled = step.lower(params, state, active).compile()
    return dict(report(compiled, chip, devices), step="decode", topology=topology, num_slices=num_slices,
                mesh=dict(mesh.shape), rows=slots, seq_len=length, remat_policy="-", attention="xla",
                model_flops_per_step=flops_per_token(model_cfg, 0) / 3 * slots)  # forward (2N) for one token a slot


def target(config, topology: str, num_slices: int):
    """(chip, devices, model config, mesh) for a config on a named slice, validated first."""
    chip, devices = topology_devices(topology, num_slices)
    run = config_lib.validate(config, len(devices), num_slices)
    return chip, devices, run.model, make_mesh(run.mesh, devices)


def report(compiled, chip: Chip, devices) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return dict(
        devices=len(devices),
        argument_gib=mem.argument_size_in_bytes / GiB, output_gib=mem.output_size_in_bytes / GiB,
        temp_gib=mem.temp_size_in_bytes / GiB, alias_gib=mem.alias_size_in_bytes / GiB, total_gib=total / GiB,
        hbm_gib=chip.hbm_bytes / GiB, headroom_gib=(chip.hbm_bytes - total) / GiB, fits=total <= chip.hbm_bytes,
        # Arrays kept in host memory (train.opt_state_memory="pinned_host"), outside the HBM total.
        host_argument_gib=mem.host_argument_size_in_bytes / GiB, host_output_gib=mem.host_output_size_in_bytes / GiB,
        host_temp_gib=mem.host_temp_size_in_bytes / GiB, host_alias_gib=mem.host_alias_size_in_bytes / GiB,
        compiler_flops_per_device=float(cost.get("flops", 0.0)) if cost else 0.0,
        pallas_kernels=pallas_kernel_calls(compiled),
    )


def pallas_kernel_calls(compiled) -> int:
    """Pallas/Mosaic kernels in the compiled program (splash attention: forward, dq, dkv per call);
    -1 where the compiled HLO cannot be printed (XLA's printer fails on some async programs,
    e.g. the 65B LoRA step on v5p-8: 'async-update instruction should have 1 operands')."""
    try:
        return compiled.as_text().count('custom_call_target="tpu_custom_call"')
    except jax.errors.JaxRuntimeError:
        return -1


def format_report(r: dict) -> str:
    return "\n".join([
        f"{r['step']} step on {r['topology']} x{r['num_slices']} slice(s): {r['devices']} devices, mesh {r['mesh']}",
        f"{r['rows']} rows x {r['seq_len']} tokens, remat={r['remat_policy']}, attention={r['attention']} "
        f"({r['pallas_kernels']} Pallas kernel calls in the program)",
        *([f"batch: {r['layout']}; rows: {r['rows_from']}"] if "layout" in r else []),
        *([f"step shapes compiled: {', '.join(f'{n} rows' for n in r['shapes'])} (memory: the largest)"]
          if len(r.get("shapes", ())) > 1 else []),
        f"per-device memory: arguments {r['argument_gib']:.2f} GiB, outputs {r['output_gib']:.2f} GiB, "
        f"temporaries {r['temp_gib']:.2f} GiB, donated {r['alias_gib']:.2f} GiB",
        f"total {r['total_gib']:.2f} GiB of {r['hbm_gib']:.0f} GiB HBM (headroom {r['headroom_gib']:.2f} GiB)",
        *([f"offload: optimizer state in {r['opt_state_memory']} memory (train.opt_state_memory); per-device host "
           f"memory: arguments {r['host_argument_gib']:.2f} GiB, outputs {r['host_output_gib']:.2f} GiB, temporaries "
           f"{r['host_temp_gib']:.2f} GiB, donated {r['host_alias_gib']:.2f} GiB"]
          if r.get("opt_state_memory", "device") != "device" else []),
        f"FLOPs per step: compiler {r['compiler_flops_per_device'] * r['devices']:.3e} (all devices; loop "
        f"bodies such as the layer scan counted once), model {r['model_flops_per_step']:.3e}",
        f"verdict: {'FITS' if r['fits'] else 'DOES NOT FIT'}",
    ])

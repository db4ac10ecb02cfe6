"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and main activation carries logical names (`embed`, `heads`, `batch`, ...);
`RULES` alone decides where each lives on the mesh, as in MaxText. The mesh has four axes:
`data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded, ZeRO-3 style), `context` (the sequence of each row split over devices) and `tensor`
(Megatron-style: heads, MLP and vocabulary split). For multi-slice pods each axis also has a
DCN factor (`dcn_data`, ...), multiplied in by `mesh_utils.create_hybrid_device_mesh`, so the
same rules work across slices.

`context` is not a config key: the batch layout sets it. LIMA's batch is fixed in examples,
so a slice can have more batch shards (data x fsdp) than a step has rows; then part of the
fsdp axis becomes `context` and those devices share rows token-wise instead of the batch
growing (`batch_layout`). Parameters are sharded over fsdp and context alike, so the
parameter and optimizer memory per device does not change.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lima_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "context", "tensor")
CONFIG_AXES = ("data", "fsdp", "tensor")  # config.mesh keys; `context` comes from the batch layout

# logical name -> mesh axes, tried in order; an axis already used by an earlier dimension of
# the same array is skipped (e.g. `embed` on fsdp is dropped for an activation whose batch
# already took fsdp).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", ("context",)),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    # parameters
    ("layers", ()),
    ("embed", ("fsdp", "context")),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("norm", ()),
    # LoRA adapters: the small rank axis is replicated. An adapter without an `embed` axis (b of
    # q/k/v/gate/up/head, a of o/down) shards its head_dim, mlp or vocab axis over fsdp instead,
    # so no adapter or its moments sits whole on every device; fitted to the shape (`named_shardings`).
    ("lora_rank", ()),
    ("lora_head_dim", ("fsdp", "context")),
    ("lora_mlp", ("tensor", "fsdp", "context")),
    ("lora_vocab", ("tensor", "fsdp", "context")),
    # KV cache for sampling
    ("cache_layers", ()),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", ()),
    ("cache_kv_heads", ("tensor",)),
    ("cache_head_dim", ()),
)
_RULE_TABLE = dict(RULES)


def logical_to_spec(logical_axes: Sequence[str | None], mesh_axis_names: Sequence[str] = MESH_AXES) -> P:
    """PartitionSpec for an array whose dimensions have these logical names."""
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in _RULE_TABLE:
            raise KeyError(f"logical axis {name!r} has no rule in lima_jax.sharding.RULES")
        axes = tuple(a for a in _RULE_TABLE[name] if a in mesh_axis_names and a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh.axis_names))


def named_shardings(logical_tree, mesh: Mesh, shapes=None):
    """A tree of logical-name tuples (or PartitionSpecs of names) -> NamedShardings on `mesh`.
    With `shapes` (a matching tree of arrays or ShapeDtypeStructs) a dimension keeps only the
    leading mesh axes whose product divides it."""
    is_axes = lambda x: isinstance(x, (tuple, P))  # noqa: E731
    shardings = jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(tuple(axes), mesh.axis_names)),
                             logical_tree, is_leaf=is_axes)
    if shapes is None:
        return shardings
    return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s.spec, x.shape, mesh)), shardings, shapes)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with, per dimension, trailing mesh axes dropped until their product divides its size."""
    out = []
    for entry, size in zip((*spec, *(None,) * (len(shape) - len(spec))), shape):
        axes = list(entry if isinstance(entry, tuple) else (entry,) if entry else ())
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        out.append(axes[0] if len(axes) == 1 else (tuple(axes) or None))
    return P(*out)


def resolve_mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1, context: int = 1
                       ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ICI shape, DCN shape) over MESH_AXES; one `-1` per group takes what remains, and
    `context` devices of the ICI fsdp axis become the context axis.

    Raises ValueError naming the `config.mesh.*` keys when the sizes do not fit the devices.
    """
    if dataclasses.is_dataclass(mesh_cfg):  # run_config.MeshConfig; a saved config's mesh is a mapping
        mesh_cfg = dataclasses.asdict(mesh_cfg)
    if num_devices % num_slices:
        raise ValueError(f"{num_devices} devices do not split into {num_slices} equal slices")
    dcn = _fill([int(mesh_cfg.get(f"dcn_{a}", 1)) for a in CONFIG_AXES], num_slices, "dcn_", num_devices, "slices")
    data, fsdp, tensor = _fill([int(mesh_cfg[a]) for a in CONFIG_AXES], num_devices // num_slices, "", num_devices,
                               "devices per slice")
    if fsdp % context:
        raise ValueError(f"context parallelism over {context} devices needs them within the fsdp axis "
                         f"(config.mesh.fsdp resolves to {fsdp})")
    return (data, fsdp // context, context, tensor), (dcn[0], dcn[1], 1, dcn[2])


def _fill(sizes, total, prefix, num_devices, what):
    keys = [f"config.mesh.{prefix}{a}" for a in CONFIG_AXES]
    for key, size in zip(keys, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"{key}={size}: mesh sizes must be positive or -1")
    if sizes.count(-1) > 1:
        raise ValueError(f"only one of {', '.join(keys)} may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ValueError(
                f"{', '.join(f'{k}={s}' for k, s in zip(keys, sizes))}: the fixed sizes ({known}) do not divide "
                f"the {total} {what} ({num_devices} devices in all)"
            )
        sizes = [total // known if s == -1 else s for s in sizes]
    elif known != total:
        raise ValueError(
            f"{', '.join(f'{k}={s}' for k, s in zip(keys, sizes))} multiply to {known}, "
            f"but there are {total} {what} ({num_devices} devices in all)"
        )
    return sizes


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices (joined over DCN) the devices span; 1 off TPU pods."""
    return len({getattr(d, "slice_index", 0) for d in devices})


# Where an array lives between steps: the accelerator's own memory, or page-locked host memory
# that the device reads and writes directly (jax's memory kinds; `train.opt_state_memory`).
MEMORY_KINDS = ("device", "pinned_host")


def check_memory_kind(devices: Sequence[jax.Device], kind: str, key: str) -> None:
    """Raise ConfigError naming `key` when `devices` have no memory of `kind` (jax's memory kinds)."""
    have = sorted({m.kind for m in devices[0].addressable_memories()})
    if kind not in MEMORY_KINDS or kind not in have:
        raise ConfigError(f"config.{key}={kind!r}: the {devices[0].platform} devices have the memory kinds {have}; "
                          f"choose one of {[k for k in MEMORY_KINDS if k in have]}")


def in_memory(shardings, kind: str):
    """`shardings` (a tree of NamedShardings) with their arrays kept in memory `kind`."""
    return shardings if kind == "device" else jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None, context: int = 1) -> Mesh:
    """The training/sampling mesh from `config.mesh` over `devices` (default: all devices),
    `context` of the fsdp devices splitting sequences (see `batch_layout`)."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = resolve_mesh_shape(mesh_cfg, len(devices), num_slices(devices), context)
    if math.prod(dcn) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Topology-aware placement does not know every device kind (e.g. CPU meshes with
            # odd shapes); a plain reshape is correct, only possibly slower.
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How a step's [rows, seq_len] batch lies over the devices."""
    rows: int  # rows a step, all micro-batches together
    rows_needed: int  # rows the packing of the fullest step needs
    grad_accum_steps: int
    batch_shards: int  # data x fsdp devices (ICI and DCN) before context is carved out
    context: int  # devices that split each row's tokens

    @property
    def row_shards(self) -> int:
        return self.batch_shards // self.context

    def describe(self, seq_len: int) -> str:
        micro = self.rows // self.grad_accum_steps
        where = (f"{micro / self.row_shards:g} row(s) x {seq_len} tokens a device" if self.context == 1 else
                 f"{micro // self.row_shards} row(s) x {seq_len // self.context} tokens a device: each row split "
                 f"over {self.context} devices (context parallel)")
        spare = self.rows - self.rows_needed
        pad = f", {spare} spare row(s) of padding" if spare > 0 else ""
        accum = f" in {self.grad_accum_steps} micro-batches of {micro}" if self.grad_accum_steps > 1 else ""
        return f"{self.rows} rows a step{accum} over {self.batch_shards} batch shard(s): {where}{pad}"


def batch_layout(rows_needed: int, grad_accum_steps: int, batch_shards: int, fsdp: int, seq_len: int,
                 fixed_rows: int = 0, allow_context: bool = True) -> BatchLayout:
    """Rows a step and the context size for a step whose packing needs `rows_needed` rows.

    A micro-batch of m rows on `batch_shards` shards: the rows go over gcd(m, shards) of them
    and each row's tokens over the remaining factor (context), which must come out of the ICI
    `fsdp` axis and divide `seq_len`. Without `fixed_rows`, the smallest m from the need up
    that lays out is taken; m a multiple of the shards always does (rows of padding: the
    fallback, e.g. where attention cannot split the sequence)."""
    if fixed_rows > 0:
        if fixed_rows < rows_needed:
            raise ValueError(f"config.data.rows_per_step={fixed_rows}: the fullest step's examples need "
                             f"{rows_needed} rows of {seq_len} tokens; raise it or use -1 (sized by the plan)")
        if fixed_rows % grad_accum_steps:
            raise ValueError(f"config.train.grad_accum_steps={grad_accum_steps} does not divide "
                             f"config.data.rows_per_step={fixed_rows}")
        candidates = [fixed_rows // grad_accum_steps]
    else:
        first = -(-rows_needed // grad_accum_steps)
        candidates = list(range(first, -(-first // batch_shards) * batch_shards + 1))
    for micro in candidates:
        context = batch_shards // math.gcd(micro, batch_shards)
        if context == 1 or (allow_context and fsdp % context == 0 and seq_len % context == 0):
            return BatchLayout(micro * grad_accum_steps, rows_needed, grad_accum_steps, batch_shards, context)
    raise ValueError(f"config.data.rows_per_step={fixed_rows} cannot be laid over {batch_shards} batch shards "
                     f"(fsdp {fsdp}, seq_len {seq_len}{'' if allow_context else ', no context parallelism'}): use a "
                     f"multiple of {batch_shards * grad_accum_steps} or -1")

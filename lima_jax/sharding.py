"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and main activation carries logical names (`embed`, `heads`, `batch`, ...);
`RULES` alone decides where each lives on the mesh, as in MaxText. The mesh has three axes:
`data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded, ZeRO-3 style) and `tensor` (Megatron-style: heads, MLP and vocabulary split). For
multi-slice pods each axis also has a DCN factor (`dcn_data`, ...), multiplied in by
`mesh_utils.create_hybrid_device_mesh`, so the same rules work across slices.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes, tried in order; an axis already used by an earlier dimension of
# the same array is skipped (e.g. `embed` on fsdp is dropped for an activation whose batch
# already took fsdp).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", ()),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    # parameters
    ("layers", ()),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("norm", ()),
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


def named_shardings(logical_tree, mesh: Mesh):
    """A tree of logical-name tuples (or PartitionSpecs of names) -> NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, logical_to_spec(tuple(axes), mesh.axis_names)),
        logical_tree,
        is_leaf=lambda x: isinstance(x, (tuple, P)),
    )


def resolve_mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ICI shape, DCN shape) over MESH_AXES; one `-1` per group takes what remains.

    Raises ValueError naming the `config.mesh.*` keys when the sizes do not fit the devices.
    """
    if num_devices % num_slices:
        raise ValueError(f"{num_devices} devices do not split into {num_slices} equal slices")
    dcn = _fill([int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES], num_slices, "dcn_", num_devices, "slices")
    ici = _fill([int(mesh_cfg[a]) for a in MESH_AXES], num_devices // num_slices, "", num_devices, "devices per slice")
    return tuple(ici), tuple(dcn)


def _fill(sizes, total, prefix, num_devices, what):
    keys = [f"config.mesh.{prefix}{a}" for a in MESH_AXES]
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


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The training/sampling mesh from `config.mesh` over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = resolve_mesh_shape(mesh_cfg, len(devices), num_slices(devices))
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

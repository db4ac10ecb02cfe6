"""Orbax checkpoints: what one holds, where it lives, and restoring straight into shardings.

A checkpoint directory is an Orbax `CheckpointManager` root with one folder per step. Each
step holds the items `params` (the model's nested dict of arrays, scanned-layer layout),
`meta` (JSON: model config, epoch, ...) and, in training checkpoints, `opt_state` and
`data_iter` (the Grain iterator state). A converted checkpoint is the same with only
`params` and `meta`, so the trainer and the sampler read both the same way.

Orbax writes each step to a temporary folder and renames it only once complete, so a crash
mid-save leaves nothing that `latest_step()` would pick for a resume. Restores read into
the target shardings, so each host reads only the bytes of the shards it holds.
"""

import pathlib

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

PARAMS, OPT_STATE, DATA_ITER, META = "params", "opt_state", "data_iter", "meta"
CHECKPOINTS_SUBDIR = "checkpoints"  # inside a training work dir


def manager(directory, *, keep_steps=(), keep_latest: int = 1, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the `keep_latest` newest steps plus every step in `keep_steps`."""
    policy = pp.AnyPreservationPolicy([pp.LatestN(keep_latest), pp.CustomSteps(list(keep_steps))])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(epath.Path(directory), options=options)


def locate(path) -> tuple[epath.Path, int]:
    """(manager root, step) for a training work dir, a checkpoint root (latest step) or one step folder."""
    path = epath.Path(path)
    if (path / CHECKPOINTS_SUBDIR).is_dir():
        path = path / CHECKPOINTS_SUBDIR
    if path.name.isdigit() and (path / PARAMS).exists():
        return path.parent, int(path.name)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    step = manager(path, read_only=True).latest_step()
    if step is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint")
    return path, step


def target_tree(abstract, shardings):
    """ShapeDtypeStructs carrying the shardings to restore into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_params(path, abstract_params, shardings) -> dict:
    """The `params` item of a checkpoint (see `locate` for `path`), restored into `shardings`."""
    root, step = locate(path)
    with manager(root, read_only=True) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{PARAMS: ocp.args.StandardRestore(target_tree(abstract_params, shardings))}))
    return restored[PARAMS]


def read_meta(path) -> dict:
    """The JSON `meta` item (model config and run facts) of a checkpoint."""
    root, step = locate(path)
    with manager(root, read_only=True) as mngr:
        return dict(mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])


def save_params(directory, params, meta: dict, step: int = 0) -> pathlib.Path:
    """Write a params-only checkpoint (the converter's output) and wait until it is complete."""
    with manager(directory, async_save=False) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                                   META: ocp.args.JsonSave(meta)}))
        mngr.wait_until_finished()
    return epath.Path(directory) / str(step)


# ---- streamed writes and partial reads (the converter's path for models bigger than host RAM) ----

def save_params_streaming(directory, groups, meta: dict, step: int = 0, *, overwrite: bool = False,
                          chunk_bytes: int = 32 << 20, compress: bool = False) -> epath.Path:
    """Write a params-only checkpoint one parameter group at a time; the same layout as `save_params`.

    `groups` yields `(path, array)` pairs (path: a tuple of keys into the params dict, array: a
    host numpy array); each is written and dropped before the next is pulled, so host memory
    holds one group at a time. Mechanism: Orbax's partial save (`orbax.checkpoint.experimental
    .v1.partial`) adds each group to a pending OCDBT pytree and `finalize` merges them into one
    manifest. That pytree becomes the step's `params` item, next to a `meta` JSON item and the
    v0 `_CHECKPOINT_METADATA` naming the same handlers as `save_params`, so `restore_params`
    reads it with `StandardRestore` straight into target shardings. Arrays are chunked to at
    most `chunk_bytes`, so a host restoring a shard reads about that shard's bytes only and
    the writer's encode buffers stay small (host memory ~ one group + a few chunks).

    Atomic: everything is written under `<directory>.tmp-convert` and renamed to `directory`
    only when complete. An existing `directory` is refused unless `overwrite`.
    """
    import json

    from orbax.checkpoint.experimental import v1 as ocp1
    from orbax.checkpoint.experimental.v1 import partial

    directory = epath.Path(directory)
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} already exists and is not empty; pass --overwrite to replace it")
    tmp = directory.parent / f"{directory.name}.tmp-convert"
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir(parents=True)
    step_dir = tmp / str(step)
    ctx = ocp1.Context()
    ctx.array.saving.storage_options.chunk_byte_size = chunk_bytes
    ctx.array.saving.use_compression = compress  # weights barely compress; zstd costs time and buffers
    # Each save below blocks until written and nothing mutates the array meanwhile, so Orbax's
    # defensive host copy (a second copy of the whole group) is not needed.
    ctx.memory.deepcopy_host_arrays = False
    try:
        with ctx:
            for path, array in groups:
                tree: dict = {}
                node = tree
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = array
                partial.save(step_dir, tree)
                del tree, node, array
            partial.finalize(step_dir)
        (step_dir / "state").rename(step_dir / PARAMS)
        indicator = step_dir / "orbax.checkpoint"  # the v1 layout marker; this is a v0 manager step
        if indicator.exists():
            indicator.unlink()
        (step_dir / META).mkdir()
        ocp.JsonCheckpointHandler().save(step_dir / META, args=ocp.args.JsonSave(meta))
        info = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
        info["item_handlers"] = {
            META: "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler",
            PARAMS: "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"}
        (step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(info))
    except BaseException:
        tmp.rmtree()  # a failed conversion leaves nothing behind, least of all a complete-looking step
        raise
    if directory.exists():
        old = directory.parent / f"{directory.name}.tmp-replaced"
        directory.rename(old)
        tmp.rename(directory)
        old.rmtree()
    else:
        tmp.rename(directory)
    return directory / str(step)


def restore_params_subset(path, subset_abstract: dict, shardings=None) -> dict:
    """Only the leaves named in `subset_abstract` (a sub-dict of the params tree of
    ShapeDtypeStructs) from a checkpoint's `params` item; numpy arrays unless `shardings`."""
    import numpy as np

    root, step = locate(path)
    if shardings is None:
        restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype),
                                    subset_abstract)
        item = subset_abstract
    else:
        item = target_tree(subset_abstract, shardings)
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(root / str(step) / PARAMS, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))

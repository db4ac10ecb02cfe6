"""Orbax checkpoints: what one holds, where it lives, and restoring straight into shardings.

A checkpoint directory is an Orbax `CheckpointManager` root with one folder per step. Each
step holds the items `params` (the model's nested dict of arrays, scanned-layer layout),
`meta` (JSON: model config, tokenizer, ...; its typed form is lima_jax.model_store's) and, in training checkpoints, `opt_state` and
`data_iter` (the Grain iterator state). A converted checkpoint is the same with only
`params` and `meta`, so the trainer and the sampler read both the same way.

Orbax writes each step to a temporary folder and renames it only once complete, so a crash
mid-save leaves nothing that `latest_step()` would pick for a resume. Restores read into
the target shardings, so each host reads only the bytes of the shards it holds.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from lima_jax import storage

PARAMS, OPT_STATE, DATA_ITER, META = "params", "opt_state", "data_iter", "meta"
CHECKPOINTS_SUBDIR = "checkpoints"  # inside a training work dir


def as_path(path) -> epath.Path:
    """An epath for a local or gs:// path; local ones made absolute (see `storage.path`)."""
    return storage.path(path)


def manager(directory, *, keep_steps=(), keep_latest: int = 1, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the `keep_latest` newest steps plus every step in `keep_steps`."""
    policy = pp.AnyPreservationPolicy([pp.LatestN(keep_latest), pp.CustomSteps(list(keep_steps))])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(as_path(directory), options=options)


def locate(path) -> tuple[epath.Path, int]:
    """(manager root, step) for a training work dir, a checkpoint root (latest step) or one step folder."""
    path = as_path(path)
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


def restore_params_part(path, abstract_part, shardings) -> dict:
    """Some leaves of a checkpoint's `params` (`abstract_part`: a subtree of its nested dict),
    restored into `shardings`; the rest is not read (a base read one tensor at a time)."""
    root, step = locate(path)
    target = target_tree(abstract_part, shardings)
    with manager(root, read_only=True) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)}))
    return restored[PARAMS]


def read_meta_json(path) -> dict:
    """The `meta` item of a checkpoint (see `locate` for `path`) as written: a JSON dict
    (lima_jax.model_store reads it as a typed record)."""
    root, step = locate(path)
    with manager(root, read_only=True) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def save_train_state(mngr: ocp.CheckpointManager, step: int, params, opt_state, data_iter,
                     meta: dict) -> None:
    """One training checkpoint: params, optimizer state, the Grain iterator and the meta record
    (asynchronous if the manager is). A step already saved is left alone."""
    import grain

    if mngr.latest_step() == step:
        return
    mngr.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        OPT_STATE: ocp.args.StandardSave(opt_state),
        DATA_ITER: grain.checkpoint.CheckpointSave(data_iter),
        META: ocp.args.JsonSave(meta),
    }))


def restore_train_state(mngr: ocp.CheckpointManager, params_target, opt_state_target, data_iter,
                        warn) -> tuple[int, Any, Any, dict] | None:
    """(step, params, opt_state, meta JSON) of the newest checkpoint that restores and holds finite
    parameters, read into the targets' shardings (see `target_tree`); `data_iter` is set to
    that step's position. None when there is none.

    A checkpoint that fails is never deleted: it is moved to `damaged/STEP` beside the
    checkpoints (so no later save collides with it), `warn` names it, and the previous
    complete one is tried."""
    import grain

    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardRestore(params_target),
                OPT_STATE: ocp.args.StandardRestore(opt_state_target),
                DATA_ITER: grain.checkpoint.CheckpointRestore(data_iter),  # restores in place
                META: ocp.args.JsonRestore(),
            }))
            problem = None if all_finite(restored[PARAMS]) else "its parameters are not all finite"
        except Exception as e:  # noqa: BLE001  any failure to read a step means: try the one before
            problem = f"it does not restore ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        if problem is None:
            return step, restored[PARAMS], restored[OPT_STATE], restored[META]
        moved = set_aside(mngr, step)
        warn(f"checkpoint {mngr.directory}/{step} is damaged: {problem}; moved to {moved}, "
             f"falling back to the previous one")
    return None


def all_finite(tree) -> bool:
    import jax.numpy as jnp

    leaves = jax.tree.leaves(tree)
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


def set_aside(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
    """Move a damaged step out of the manager's view (process 0 moves, everyone waits)."""
    from jax.experimental import multihost_utils

    source = epath.Path(mngr.directory) / str(step)
    target = epath.Path(mngr.directory) / "damaged" / str(step)
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{step}.{len(list(target.parent.iterdir()))}")
        source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"lima_jax set aside {step}")
    mngr.reload()
    return target


def save_params(directory, params, meta: dict, step: int = 0) -> pathlib.Path:
    """Write a params-only checkpoint (the converter's output) and wait until it is complete."""
    with manager(directory, async_save=False) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                                   META: ocp.args.JsonSave(meta)}))
        mngr.wait_until_finished()
    return as_path(directory) / str(step)


# ---- streamed writes and partial reads (the converter's path for models bigger than host RAM) ----

def save_params_streaming(directory, leaves, meta: dict, step: int = 0, *, overwrite: bool = False,
                          chunk_bytes: int = 32 << 20, compress: bool = False,
                          node_cache_bytes: int = 0) -> epath.Path:
    """Write a params-only checkpoint one layer slice at a time; restores like `save_params`'s.

    `leaves` yields `(path, spec, slices)`: `path` a tuple of keys into the params dict, `spec`
    anything with `.shape` and `.dtype` (the whole leaf), and `slices` an iterable of
    `(index, array)` pairs: `index=None` writes the whole leaf, an int `i` writes `leaf[i]`
    (one layer of a stacked [layers, ...] leaf; every layer exactly once). Each slice is
    written and committed before the next is pulled, so host memory holds one slice (one
    layer's tensor) plus its write buffers, however deep the model is.

    Mechanism: each leaf is created in the step's `params` OCDBT database with its final
    shape, with Orbax's own tensorstore spec (zarr3; chunks of at most `chunk_bytes`, inside
    one layer when written by layer, so a host restoring a shard reads about that shard's
    bytes), and written slice by slice. The OCDBT B-tree node cache is `node_cache_bytes`
    (Orbax uses 100 MB; every commit writes a new root node, and a big cache keeps the old
    ones, so RSS would grow with the number of writes). Then the Orbax tree `_METADATA`, a
    `meta` JSON item and the step's `_CHECKPOINT_METADATA` naming the same handlers as
    `save_params` are added, so `restore_params` reads it with `StandardRestore` straight into
    target shardings.

    Atomic: everything is written under `<directory>.tmp-convert` and renamed to `directory`
    only when complete. An existing `directory` is refused unless `overwrite`; an existing
    `.tmp-convert` (or `.tmp-replaced`) folder belongs to another run and is refused, never removed.

    Orbax layout: the array spec comes from Orbax's `tensorstore_utils` (a private module) and
    the metadata files are written as Orbax 0.12.8 writes them; pyproject pins that version and
    `tests/test_convert_orbax_layout.py` compares both with what Orbax itself writes.
    """
    import json
    import time

    import numpy as np
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # private: orbax pinned

    directory = as_path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} already exists and is not empty; pass --overwrite to replace it")
    tmp, old = (directory.parent / f"{directory.name}.tmp-{what}" for what in ("convert", "replaced"))
    for folder in (tmp, old):
        if folder.exists():
            raise FileExistsError(f"{folder} already exists (left by an interrupted conversion, or one still "
                                  "running); remove it yourself once no conversion is using it, then rerun")
    step_dir = tmp / str(step)
    params_dir = step_dir / PARAMS
    params_dir.mkdir(parents=True)
    init_ns = time.time_ns()
    context = ts.Context({"file_io_concurrency": {"limit": 128},
                          "cache_pool#ocdbt": {"total_bytes_limit": node_cache_bytes}})
    tree_metadata = {}
    try:
        for path, spec, slices in leaves:
            name = ".".join(path)
            shape, dtype = tuple(spec.shape), np.dtype(spec.dtype)
            array, written = None, set()
            for index, value in slices:
                if index is not None and not (isinstance(index, int) and 0 <= index < shape[0]):
                    raise ValueError(f"{name}: slice index {index!r}; expected None or a layer in [0, {shape[0]})")
                if array is None:  # the first slice says how the leaf is written, which sets its chunks
                    write_shape = shape if index is None else (1, *shape[1:])
                    write = ts_utils.ArrayWriteSpec(
                        str(params_dir), name, global_shape=shape, write_shape=write_shape, dtype=dtype,
                        chunk_byte_size=chunk_bytes, use_compression=compress, use_zarr3=True, use_ocdbt=True)
                    array = ts.open(ts.Spec(write.json), create=True, open=True, context=context).result()
                target = array if index is None else array[index]
                if tuple(np.shape(value)) != tuple(target.shape):
                    raise ValueError(f"{name}[{index}]: got shape {np.shape(value)}, expected {tuple(target.shape)}")
                if index in written or (written and (index is None) != (None in written)):
                    raise ValueError(f"{name}[{index}] written twice")
                target.write(np.asarray(value, dtype)).result()
                written.add(index)
                del value, target
            want = {None} if None in written else set(range(shape[0]))
            if written != want:
                raise ValueError(f"{name}: never written: layer(s) {sorted(want - written)[:5] or 'all'}")
            del array
            tree_metadata[str(tuple(path))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2: a dict key
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
        (params_dir / "_METADATA").write_text(json.dumps({
            "tree_metadata": tree_metadata, "use_ocdbt": True, "use_zarr3": True,
            "store_array_data_equal_to_fill_value": ts_utils.STORE_ARRAY_DATA_EQUAL_TO_FILL_VALUE,
            "custom_metadata": None}))
        (step_dir / META).mkdir()
        ocp.JsonCheckpointHandler().save(step_dir / META, args=ocp.args.JsonSave(meta))
        (step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": {
                META: "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler",
                PARAMS: "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"},
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": init_ns,
            "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}))
        for d in (params_dir, step_dir):  # what Orbax leaves where renames are not atomic (gs://)
            (d / "commit_success.txt").write_text(f"Checkpoint commit was successful to {d}")
    except BaseException:
        tmp.rmtree()  # a failed conversion leaves nothing behind, least of all a complete-looking step
        raise
    if directory.exists():
        directory.rename(old)
        tmp.rename(directory)
        old.rmtree()
    else:
        tmp.rename(directory)
    return directory / str(step)


class ParamsReader:
    """Slices of a checkpoint's `params` leaves, read straight from its tensorstore arrays.

    `read(path, index)` returns `leaf[index]` (`index=None`: the whole leaf) as a numpy array
    of the stored dtype, reading only the chunks that slice touches; nothing is cached, so an
    exporter walking a model layer by layer holds one layer's tensor at a time. Works for
    converted and trained checkpoints (zarr2 or zarr3, OCDBT or not, per the item's
    `_METADATA`). `path` is as in `locate`.
    """

    def __init__(self, path):
        import json

        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # private: orbax pinned

        root, step = locate(path)
        self.dir = root / str(step) / PARAMS
        info = json.loads((self.dir / "_METADATA").read_text())
        self.use_zarr3, self.use_ocdbt = bool(info.get("use_zarr3", False)), bool(info.get("use_ocdbt", True))
        self._ts_utils = ts_utils
        self._context = ts_utils.get_ts_context(use_ocdbt=self.use_ocdbt)
        self._open: dict = {}

    def array(self, path: tuple[str, ...]):
        """The leaf as a lazily read `tensorstore.TensorStore` (has `.shape`, `.dtype`)."""
        import tensorstore as ts

        name = ".".join(path)
        if name not in self._open:
            spec = self._ts_utils.ArrayReadSpec(str(self.dir), name, self.use_zarr3, use_ocdbt=self.use_ocdbt)
            self._open[name] = ts.open(ts.Spec(spec.json), open=True, read=True, context=self._context).result()
        return self._open[name]

    def read(self, path: tuple[str, ...], index=None):
        array = self.array(path)
        return (array if index is None else array[index]).read().result()

"""Orbax checkpoints: what one holds, where it lives, and restoring straight into shardings.

A checkpoint directory is an Orbax `CheckpointManager` root with one folder per step. Each
step holds the items `params` (the model's nested dict of arrays, scanned-layer layout),
`meta` (JSON: model config, tokenizer, ...; typed by lima_jax.model_store), `fingerprints` (JSON: a checksum of every saved
array's bits, `lima_jax.fingerprints`) and, in training checkpoints, `opt_state` and
`data_iter` (the Grain iterator state). A converted checkpoint is the same with only
`params`, `meta` and `fingerprints`, so the trainer and the sampler read both the same way.

Checkpoints cannot lie: every restore compares the arrays it read with their fingerprints and
checks them for non-finite values; a step that fails is `DamagedCheckpoint`. Training sets it
aside and resumes from the one before (`restore_train_state`); readers fall back the same way
with a warning (`newest_good`), unless the user named that very step.

Orbax writes each step to a temporary folder and renames it only once complete, so a crash
mid-save leaves nothing that `latest_step()` would pick for a resume. Restores read into
the target shardings, so each host reads only the bytes of the shards it holds.
"""

import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from lima_jax import fingerprints as fp, storage
from lima_jax.errors import DamagedCheckpoint, LimaError

PARAMS, OPT_STATE, DATA_ITER, META, FINGERPRINTS = "params", "opt_state", "data_iter", "meta", "fingerprints"
T = TypeVar("T")
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
    root, steps, _ = candidates(path)
    return root, steps[0]


def candidates(path) -> tuple[epath.Path, list[int], bool]:
    """(manager root, steps to try newest first, whether the step was named explicitly): the
    one step of a step folder, or every complete step of a work dir or checkpoint root."""
    path = as_path(path)
    if (path / CHECKPOINTS_SUBDIR).is_dir():
        path = path / CHECKPOINTS_SUBDIR
    if path.name.isdigit() and (path / PARAMS).exists():
        return path.parent, [int(path.name)], True
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    steps = sorted(manager(path, read_only=True).all_steps(), reverse=True)
    if not steps:
        if any(path.glob("*.safetensors")) or any(path.glob("consolidated.*.pth")):  # weights as released
            raise FileNotFoundError(f"{path} is a Hugging Face or Meta model folder, not a lima_jax checkpoint: "
                                    f"convert it first with `python launch/convert_checkpoint.py --input {path} "
                                    "--output CKPT`, then pass --checkpoint CKPT")
        raise FileNotFoundError(f"{path} holds no complete checkpoint")
    return path, steps, False


def newest_good(path, load: Callable[[epath.Path], T], warn: Callable[[str], None]) -> T:
    """`load(step folder)` for the newest step of `path` that loads without `DamagedCheckpoint`
    (or any failure to read it), warning about each damaged step passed over. A step folder
    named explicitly is the user's choice: its damage is raised, never stepped over."""
    root, steps, explicit = candidates(path)
    for step in steps:
        try:
            return load(root / str(step))
        except DamagedCheckpoint as e:
            problem = str(e)
        except (FileNotFoundError, PermissionError, LimaError):  # the user's to fix, not the step's damage
            raise
        except Exception as e:  # noqa: BLE001  anything else that fails to read a step: try the one before
            problem = f"{root / str(step)} does not restore ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        if explicit:
            raise DamagedCheckpoint(f"{problem}; it was named explicitly, so no other step is used",
                                    todo="name another step, or the work dir to use the newest good one")
        warn(f"warning: checkpoint step {step} is damaged: {problem}; falling back to the previous step")
    raise DamagedCheckpoint(f"every checkpoint in {root} is damaged (steps {steps})")


def target_tree(abstract, shardings):
    """ShapeDtypeStructs carrying the shardings to restore into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_params(path, abstract_params, shardings, *, part: bool = False) -> dict:
    """The `params` item of a checkpoint (see `locate` for `path`), restored into `shardings`
    and checked against its fingerprints (`DamagedCheckpoint` if they differ or a value is not
    finite). `part`: `abstract_params` is a subtree of the stored nested dict; the rest is not
    read (a base read one tensor at a time). Leaves asked for in another dtype than saved are
    read one at a time in the saved dtype, checked, then cast on the devices, so the whole tree
    never exists twice."""
    root, step = locate(path)
    recorded = read_fingerprints(root / str(step)).get(PARAMS, {})
    names = [fp.leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
    recast = [n for n, a in zip(names, jax.tree.leaves(abstract_params))
              if n in recorded and recorded[n].split(":")[0] != str(a.dtype)]
    if not recast:
        return _restore_part(root, step, abstract_params, shardings, recorded, partial=part)
    same = _select(abstract_params, lambda n: n not in recast)
    params = _restore_part(root, step, same, _like(shardings, same), recorded) if same else {}
    for name in recast:  # one leaf at a time: its saved dtype, checked, then cast
        key = tuple(name.split("/"))
        leaf = _get(abstract_params, key)
        saved = jax.ShapeDtypeStruct(leaf.shape, recorded[name].split(":")[0])
        sharding = _get(shardings, key)
        value = _get(_restore_part(root, step, _nest(key, saved), _nest(key, sharding), recorded), key)
        _put(params, key, jax.jit(lambda x, d=leaf.dtype: x.astype(d), out_shardings=sharding, donate_argnums=0)(value))
    return params


def _restore_part(root, step: int, abstract, shardings, recorded: dict, partial: bool = True) -> dict:
    target = target_tree(abstract, shardings)
    if partial:
        args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
    else:
        args = ocp.args.StandardRestore(target)
    try:
        with manager(root, read_only=True) as mngr:
            restored = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: args}))[PARAMS]
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001  unreadable array data is damage, named with its step
        raise DamagedCheckpoint(f"{root / str(step)} does not restore ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from e
    problem = check_arrays({PARAMS: restored}, {PARAMS: recorded} if recorded else {})
    if problem:
        raise DamagedCheckpoint(f"{root / str(step)}: {problem}")
    return restored


def _select(tree: dict, keep, prefix: str = "") -> dict:  # the nested dict of the leaves whose name `keep`s
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        sub = _select(v, keep, name + "/") if isinstance(v, dict) else v if keep(name) else None
        if sub is not None and sub != {}:
            out[k] = sub
    return out


def _like(tree: dict, shape: dict) -> dict:  # `tree`'s leaves at the paths of `shape`
    return {k: _like(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in shape.items()}


def _get(tree, key: tuple):
    for k in key:
        tree = tree[k]
    return tree


def _put(tree: dict, key: tuple, value) -> None:
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def _nest(key: tuple, value) -> dict:
    return {key[0]: _nest(key[1:], value)} if len(key) > 1 else {key[0]: value}


def with_dtypes(tree) -> dict[str, str]:
    """The fingerprints of `tree`'s arrays as recorded: {leaf name: "dtype:16 hex digits"}."""
    dtypes = {fp.leaf_name(p): str(x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return {name: f"{dtypes[name]}:{value}" for name, value in fp.fingerprints(tree).items()}


def check_arrays(items: dict, recorded: dict) -> str | None:
    """What is wrong with restored items ({name: tree}), or None: a fingerprint that differs
    from `recorded` ({name: {leaf: "dtype:hex"}}; items without a record are not compared: a
    checkpoint written before fingerprints existed), or a value that is not finite."""
    for item, tree in items.items():
        if item in recorded:
            bad = fp.mismatches(recorded[item], with_dtypes(tree))
            if bad:
                return f"the {item} array(s) {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} differ from " \
                       "their fingerprints (the files changed after saving: a bad disk or copy)"
        if not all_finite(tree):
            return f"its {item} hold non-finite values (NaN or inf)"
    return None


def read_fingerprints(step_dir) -> dict:
    """The `fingerprints` item of a step folder ({} for a checkpoint saved without them)."""
    step_dir = as_path(step_dir)
    if not (step_dir / FINGERPRINTS).exists():
        return {}
    with manager(step_dir.parent, read_only=True) as mngr:
        return mngr.restore(int(step_dir.name), args=ocp.args.Composite(
            **{FINGERPRINTS: ocp.args.JsonRestore()}))[FINGERPRINTS]


def params_fingerprint(path) -> str | None:
    """One digest of a checkpoint's recorded params fingerprints (see `locate` for `path`): what a
    LoRA checkpoint records of its base, so a base replaced by other weights is noticed. None
    for a checkpoint saved without fingerprints."""
    import hashlib
    import json

    root, step = locate(path)
    recorded = read_fingerprints(root / str(step)).get(PARAMS)
    return None if not recorded else hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:32]


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
        FINGERPRINTS: ocp.args.JsonSave({PARAMS: with_dtypes(params), OPT_STATE: with_dtypes(opt_state)}),
    }))


def restore_train_state(mngr: ocp.CheckpointManager, params_target, opt_state_target, data_iter,
                        warn) -> tuple[int, Any, Any, dict] | None:
    """(step, params, opt_state, meta JSON) of the newest checkpoint that restores, matches its
    fingerprints and holds finite parameters and optimizer state, read into the targets'
    shardings (see `target_tree`); `data_iter` is set to that step's position. None when
    there is none.

    A checkpoint that fails is never deleted: it is moved to `damaged/STEP` beside the
    checkpoints (so no later save collides with it), `warn` names it, and the previous
    complete one is tried."""
    import grain

    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            recorded = read_fingerprints(epath.Path(mngr.directory) / str(step))
            restored = mngr.restore(step, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardRestore(params_target),
                OPT_STATE: ocp.args.StandardRestore(opt_state_target),
                DATA_ITER: grain.checkpoint.CheckpointRestore(data_iter),  # restores in place
                META: ocp.args.JsonRestore(),
            }))
            problem = check_arrays({k: restored[k] for k in (PARAMS, OPT_STATE)}, recorded)
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
    on_device = jax.memory.Space.Device  # leaves kept in host memory are checked on their devices
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(jax.device_put(x, on_device)))
                                                      for x in xs])))(leaves))


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
        mngr.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(meta),
            FINGERPRINTS: ocp.args.JsonSave({PARAMS: with_dtypes(params)})}))
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
    tree_metadata, recorded = {}, {}
    try:
        for path, spec, slices in leaves:
            name = ".".join(path)
            shape, dtype = tuple(spec.shape), np.dtype(spec.dtype)
            array, written, fingerprint = None, set(), fp.HostFingerprint()
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
                value = np.asarray(value, dtype)
                target.write(value).result()
                fingerprint.add(value, 0 if index is None else index * value.size)
                written.add(index)
                del value, target
            want = {None} if None in written else set(range(shape[0]))
            if written != want:
                raise ValueError(f"{name}: never written: layer(s) {sorted(want - written)[:5] or 'all'}")
            recorded[fp.leaf_name(path)] = f"{dtype}:{fingerprint.hex()}"
            del array
            tree_metadata[str(tuple(path))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2: a dict key
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
        (params_dir / "_METADATA").write_text(json.dumps({
            "tree_metadata": tree_metadata, "use_ocdbt": True, "use_zarr3": True,
            "store_array_data_equal_to_fill_value": ts_utils.STORE_ARRAY_DATA_EQUAL_TO_FILL_VALUE,
            "custom_metadata": None}))
        for item, record in ((META, meta), (FINGERPRINTS, {PARAMS: recorded})):
            (step_dir / item).mkdir()
            ocp.JsonCheckpointHandler().save(step_dir / item, args=ocp.args.JsonSave(record))
        json_handler = "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler"
        (step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": {
                META: json_handler, FINGERPRINTS: json_handler,
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
    `_METADATA`). `path` is as in `locate`. What is read is fingerprinted on the way; `verify()`
    then checks every leaf read whole (all its slices) as a restore does.
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
        self.recorded = read_fingerprints(root / str(step)).get(PARAMS, {})
        self._read: dict = {}  # leaf name -> [HostFingerprint, elements read, all finite]

    def array(self, path: tuple[str, ...]):
        """The leaf as a lazily read `tensorstore.TensorStore` (has `.shape`, `.dtype`)."""
        import tensorstore as ts

        name = ".".join(path)
        if name not in self._open:
            spec = self._ts_utils.ArrayReadSpec(str(self.dir), name, self.use_zarr3, use_ocdbt=self.use_ocdbt)
            self._open[name] = ts.open(ts.Spec(spec.json), open=True, read=True, context=self._context).result()
        return self._open[name]

    def read(self, path: tuple[str, ...], index=None):
        import numpy as np

        array = self.array(path)
        value = (array if index is None else array[index]).read().result()
        seen = self._read.setdefault("/".join(path), [fp.HostFingerprint(), 0, True])
        seen[0].add(value, 0 if index is None else index * value.size)
        seen[1] += value.size
        seen[2] = seen[2] and (value.dtype.kind not in "fc" or bool(np.isfinite(value).all()))
        return value

    def verify(self) -> None:
        """DamagedCheckpoint if a leaf read whole differs from its fingerprint or is not finite."""
        bad, nonfinite = [], []
        for name, (fingerprint, elements, finite) in self._read.items():
            array = self.array(tuple(name.split("/")))
            if elements != array.size:
                continue
            recorded = self.recorded.get(name)
            if recorded is not None and recorded != f"{array.dtype.numpy_dtype}:{fingerprint.hex()}":
                bad.append(name)
            if not finite:
                nonfinite.append(name)
        if bad:
            raise DamagedCheckpoint(f"{self.dir.parent}: the params array(s) {', '.join(bad[:4])} differ from their "
                                    "fingerprints (the files changed after saving: a bad disk or copy)")
        if nonfinite:
            raise DamagedCheckpoint(f"{self.dir.parent}: its params {', '.join(nonfinite[:4])} hold non-finite values")

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

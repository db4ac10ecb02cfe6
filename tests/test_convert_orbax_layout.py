"""The streaming writer's Orbax layout is Orbax's own: it uses a private Orbax module and writes
Orbax's metadata files itself, so pyproject pins orbax-checkpoint and this test fails when an
Orbax version writes (or reads) the layout differently."""

import importlib.metadata
import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lima_jax import checkpoint
from tests.conftest import ROOT

TREE = {"embed": np.arange(12, dtype=np.float32).reshape(4, 3),
        "layers": {"w": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b": np.ones((2, 5), np.float32)}}
VOLATILE = ("init_timestamp_nsecs", "commit_timestamp_nsecs")


def streamed(tree, path=()):
    """`save_params_streaming`'s leaves for `tree`: stacked leaves written one layer at a time."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from streamed(value, (*path, key))
        else:
            spec = jax.ShapeDtypeStruct(value.shape, value.dtype)
            slices = enumerate(value) if path else [(None, value)]
            yield (*path, key), spec, iter(list(slices))


def read_json(path):
    return json.loads(path.read_text())


def test_pyproject_pins_the_installed_orbax():
    pinned = re.search(r'"orbax-checkpoint==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject must pin orbax-checkpoint exactly (the streaming writer uses its private layout)"
    assert pinned.group(1) == importlib.metadata.version("orbax-checkpoint")


def test_streamed_checkpoint_has_orbaxs_metadata_and_restores_with_plain_orbax(tmp_path):
    meta = {"model": {"dim": 3}}  # the meta item as JSON (typed by lima_jax.model_store)
    checkpoint.save_params(tmp_path / "orbax", TREE, meta)  # Orbax's own writer
    checkpoint.save_params_streaming(tmp_path / "stream", streamed(TREE), meta)
    ours, theirs = tmp_path / "stream" / "0", tmp_path / "orbax" / "0"

    step_ours, step_theirs = read_json(ours / "_CHECKPOINT_METADATA"), read_json(theirs / "_CHECKPOINT_METADATA")
    for record in (step_ours, step_theirs):
        for key in VOLATILE:
            record.pop(key)
    assert step_ours == step_theirs
    items_ours, items_theirs = read_json(ours / "params" / "_METADATA"), read_json(theirs / "params" / "_METADATA")
    assert items_ours.pop("use_zarr3") is True and items_theirs.pop("use_zarr3") is False  # ours: zarr3 chunks
    assert items_ours == items_theirs
    assert read_json(ours / "meta" / "metadata") == read_json(theirs / "meta" / "metadata")
    # fingerprints taken on the host slice by slice equal those Orbax's writer took on the device
    assert read_json(ours / "fingerprints" / "metadata") == read_json(theirs / "fingerprints" / "metadata")
    assert {p.name for p in ours.iterdir()} == {p.name for p in theirs.iterdir()}

    # plain Orbax, no lima_jax code: the step's metadata and a StandardRestore of both items
    with ocp.CheckpointManager(tmp_path / "stream", options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        assert mngr.latest_step() == 0
        restored = mngr.restore(0, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), TREE)),
            meta=ocp.args.JsonRestore()))
        item_meta = mngr.item_metadata(0)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), TREE)
    assert restored["meta"] == meta
    shapes = jax.tree.map(lambda m: tuple(m.shape), dict(item_meta["params"]))
    assert shapes == jax.tree.map(lambda a: a.shape, TREE)


@pytest.mark.parametrize("leftover", ["tmp-convert", "tmp-replaced"])
def test_streaming_writer_refuses_a_foreign_temporary_folder(tmp_path, leftover):
    foreign = tmp_path / f"ckpt.{leftover}"
    foreign.mkdir()
    (foreign / "someone_elses.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=rf"ckpt\.{leftover} already exists .*remove it yourself"):
        checkpoint.save_params_streaming(tmp_path / "ckpt", streamed(TREE), {})
    assert (foreign / "someone_elses.txt").read_text() == "keep me" and not (tmp_path / "ckpt").exists()

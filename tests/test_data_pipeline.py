"""Grain pipeline on the demo data: batch contract, determinism, resume, multi-process assembly."""

import collections
import dataclasses
import importlib.util
import json
import pathlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lima_jax.config import base_config
from lima_jax.data import demo, pipeline as P

SEQ = 128


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = base_config().data
    c.update(train_path=demo.DEMO_TRAIN, tokenizer_path=demo.build_demo_tokenizer(str(tmp_path_factory.mktemp("t"))),
             seq_len=SEQ, dev_size=20, examples_per_step=16)
    return c


@pytest.fixture(scope="module")
def data(cfg):
    return P.load_data(cfg, seed=0)


@pytest.fixture(scope="module")
def plan(data, cfg):
    plan = P.make_plan(data, cfg.examples_per_step, epochs=3)
    return dataclasses.replace(plan, rows_per_step=plan.rows_needed + 1)  # one spare row, as a layout may add


def batches(it, n=None):
    return [b for _, b in zip(range(n) if n else iter(int, 1), it)]


def test_demo_file_matches_generator(tmp_path):
    path = tmp_path / "demo.jsonl"
    demo.write_demo_dataset(str(path))
    assert path.read_text() == pathlib.Path(demo.DEMO_TRAIN).read_text()
    assert len(path.read_text().splitlines()) == 200


def test_tiny_config_points_at_demo():
    spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).parents[1] / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    assert c.data.train_path == demo.DEMO_TRAIN and c.data.tokenizer_path == "" and c.data.seq_len <= c.model.max_seq_len
    assert c.model.vocab_size == demo.DEMO_PIECES + 1 == 512


def test_split_and_batch_contract(data, plan):
    assert (len(data.train), len(data.dev)) == (180, 20)
    assert not {e["line"] for e in data.train} & {e["line"] for e in data.dev}
    all_batches = batches(P.train_iterator(data, plan))
    # exactly examples_per_step examples a step, the last step the rest: the recipe's step count
    assert len(all_batches) == plan.total_steps == -(-180 * 3 // 16)
    assert [int(b["examples"]) for b in all_batches] == [16] * (plan.total_steps - 1) + [180 * 3 % 16 or 16]
    seen = collections.Counter()
    real = 0
    for b in all_batches:
        assert set(b) == {"tokens", "targets", "positions", "segment_ids", "loss_weights", "examples", "by_source"}
        assert b["by_source"].tolist() == [int(b["examples"])]
        assert all(v.shape == (plan.rows_per_step, SEQ) for k, v in b.items() if k in P.FEATURES)
        assert int(b["examples"]) == sum(len(np.unique(row[row > 0])) for row in b["segment_ids"])
        assert not b["segment_ids"][-1].any()  # the spare row is padding
        assert b["loss_weights"].dtype == np.float32 and np.isfinite(b["loss_weights"]).all()
        for row in range(plan.rows_per_step):
            seg, pos, tok = b["segment_ids"][row], b["positions"][row], b["tokens"][row]
            assert not b["loss_weights"][row][seg == 0].any() and not tok[seg == 0].any()
            for s in np.unique(seg[seg > 0]):
                idx = np.flatnonzero(seg == s)
                assert (np.diff(idx) == 1).all() and (pos[idx] == np.arange(len(idx))).all()
                assert tok[idx[0]] == data.tokenizer.bos_id
                seen[tuple(tok[idx])] += 1
                real += len(idx)
    # every train example exactly once per epoch, each a fresh segment
    expected = collections.Counter({tuple(e["ids"][:-1]): 0 for e in data.train})
    for e in data.train:
        expected[tuple(e["ids"][:-1])] += 3
    assert seen == expected
    assert real == plan.real_tokens
    assert plan.efficiency == pytest.approx(real / (plan.total_steps * plan.rows_per_step * SEQ))


def test_epochs_are_reshuffled_and_seeded(data, plan, cfg):
    first = batches(P.train_iterator(data, plan), 3)
    again = batches(P.train_iterator(data, plan), 3)
    for a, b in zip(first, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = batches(P.train_iterator(P.load_data(cfg, seed=1), plan), 1)
    assert not np.array_equal(first[0]["tokens"], other[0]["tokens"])


def test_resume_mid_epoch(data, plan, tmp_path):
    it = P.train_iterator(data, plan)
    batches(it, 2)
    state = it.get_state()
    ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckpt.save(tmp_path / "it", args=grain.checkpoint.CheckpointSave(it))
    expected = batches(it, 4)
    for restore in ("state", "orbax"):
        fresh = P.train_iterator(data, plan)
        if restore == "state":
            fresh.set_state(json.loads(json.dumps(state)))  # survives a JSON round trip too
        else:
            ckpt.restore(tmp_path / "it", args=grain.checkpoint.CheckpointRestore(fresh))
        for a, b in zip(expected, batches(fresh, 4)):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("shape", [(1, 2, 2, 2), (1, 1, 8, 1)])
def test_global_batch_on_mesh(data, plan, shape):
    """Rows over data x fsdp and tokens over context: every device holds its block."""
    from jax.sharding import Mesh
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp", "context", "tensor"))
    whole = next(P.train_iterator(data, dataclasses.replace(plan, rows_per_step=2 * plan.rows_needed)))
    out = P.global_batch(whole, mesh)
    assert set(out) == set(P.FEATURES)
    for k, v in out.items():
        assert v.shape == whole[k].shape and v.dtype == whole[k].dtype
        np.testing.assert_array_equal(np.asarray(v), whole[k])
        assert v.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "context")
        for shard in v.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), whole[k][shard.index])


def test_dev_batches_and_prompts(data, plan):
    dev = P.dev_batches(data, plan)
    assert dev and all(b["tokens"].shape == (plan.rows_per_step, SEQ) for b in dev)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in dev) == sum(len(e["ids"]) - 1 for e in data.dev)
    assert all(b["loss_weights"].sum() > 0 for b in dev[:1])
    prompts = P.dev_prompts(data, 3)
    raw = [json.loads(line)["conversations"] for line in open(demo.DEMO_TRAIN)]
    assert prompts == [raw[e["line"] - 1][:1] for e in data.dev[:3]]

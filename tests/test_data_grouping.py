"""Length-balanced grouping and row buckets of the exact batch (data.grouping, data.row_buckets),
at the plan level on the demo data (and LIMA's real lengths where ../shared has them)."""

import dataclasses

import grain
import numpy as np
import pytest

from lima_jax import config as config_lib
from lima_jax.config import base_config
from lima_jax.data import demo, pipeline as P
from lima_jax.sharding import batch_layout
from lima_jax.train.program import bucket_rows

SEQ, STEP, EPOCHS = 256, 16, 3


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = base_config().data
    c.update(train_path=demo.DEMO_TRAIN, tokenizer_path=demo.build_demo_tokenizer(str(tmp_path_factory.mktemp("t"))),
             seq_len=SEQ, dev_size=10, examples_per_step=STEP)
    return c


@pytest.fixture(scope="module")
def data(cfg):
    return P.load_data(cfg, seed=0)


def groups(data, grouping, epochs=EPOCHS):
    """Each step's examples as indices into data.train."""
    where = {id(e): i for i, e in enumerate(data.train)}
    steps = P._step_groups(data, epochs, STEP, grouping)
    return [[where[id(e)] for e in steps[i]] for i in range(len(steps))]


def test_random_grouping_is_the_shuffle_cut_in_steps(data):
    """"random" keeps the batches of runs started before data.grouping existed."""
    epochs = grain.MapDataset.source(list(range(len(data.train)))).shuffle(
        seed=P.derive_seed(0, "data/shuffle")).repeat(EPOCHS)
    stream = [epochs[i] for i in range(len(epochs))]
    steps = groups(data, "random")
    assert [stream[at:at + STEP] for at in range(0, len(stream), STEP)] == steps


def test_balanced_epochs_are_permutations_of_exact_steps(data):
    steps = groups(data, "balanced")
    n = len(data.train)
    assert [len(g) for g in steps] == [STEP] * (len(steps) - 1) + [n * EPOCHS - STEP * (len(steps) - 1)]
    stream = [i for g in steps for i in g]
    for e in range(EPOCHS):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))


def test_balanced_groupings_vary_with_seed_and_epoch_and_stay_mostly_random(data, cfg):
    steps = groups(data, "balanced")
    other = groups(P.load_data(cfg, seed=1), "balanced")
    as_sets = lambda gs: {frozenset(g) for g in gs}  # noqa: E731
    assert as_sets(steps).isdisjoint(as_sets(other))
    per_epoch = len(data.train) // STEP
    assert as_sets(steps[:per_epoch]).isdisjoint(as_sets(steps[per_epoch + 1:2 * per_epoch]))
    shuffled = [i for g in groups(data, "random") for i in g]
    moved = np.mean(np.array(shuffled) != np.array([i for g in steps for i in g]))
    assert 0 < moved < 0.25  # a few swaps, not a sort by length


def test_balanced_grouping_raises_the_real_token_share(data):
    random, balanced = (P.make_plan(data, STEP, EPOCHS, grouping) for grouping in ("random", "balanced"))
    assert (balanced.total_steps, balanced.examples, balanced.real_tokens) == (
        random.total_steps, random.examples, random.real_tokens)
    assert balanced.rows_needed < random.rows_needed and balanced.efficiency > random.efficiency + 0.2
    lengths = [len(e["ids"]) - 1 for e in data.train]
    mean_rows = -(-sum(lengths) * EPOCHS // (random.total_steps * SEQ))
    assert balanced.rows_needed == mean_rows  # every step within the mean step's rows, rounded up


def test_buckets_take_the_smallest_shape_and_the_same_examples_on_any_mesh(data):
    plan = P.make_plan(data, STEP, EPOCHS, "random", row_buckets=2)
    assert len(plan.buckets) == 2 and plan.efficiency > P.make_plan(data, STEP, EPOCHS, "random").efficiency
    seen = {}
    for shards in (1, 8):
        layout = batch_layout(plan.rows_needed, 1, shards, shards, SEQ)
        laid = dataclasses.replace(plan, rows_per_step=layout.rows, buckets=bucket_rows(layout, plan.buckets))
        assert all(rows % layout.row_shards == 0 for rows in laid.shapes)
        steps = []
        for batch in P.train_iterator(data, laid):
            used = int((batch["segment_ids"] > 0).any(axis=1).sum())
            assert batch["tokens"].shape[0] == min(r for r in laid.shapes if r >= used)
            steps.append(sorted(batch["tokens"][batch["segment_ids"] > 0].tolist()))
        seen[shards] = steps
    assert seen[1] == seen[8] and len(seen[1]) == plan.total_steps


def test_balanced_iterator_resumes_identically(data):
    plan = P.make_plan(data, STEP, EPOCHS, "balanced", row_buckets=2)
    plan = dataclasses.replace(plan, rows_per_step=plan.rows_needed)
    it = P.train_iterator(data, plan)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = P.train_iterator(data, plan)
    fresh.set_state(state)
    for want, got in zip(expected, (next(fresh) for _ in range(4))):
        for k in P.FEATURES:
            np.testing.assert_array_equal(want[k], got[k])


def test_grouping_is_part_of_the_run_identity():
    c = base_config()
    c.data.grouping = "random"
    old = config_lib.run_identity(c, "t", "d")
    assert "data.grouping" not in old  # a run from before data.grouping has this identity
    c.data.grouping = "balanced"
    assert config_lib.changed_run_keys(old, config_lib.run_identity(c, "t", "d")) == ["data.grouping"]
    for key, value in (("grouping", "sorted"), ("row_buckets", 4)):
        bad = base_config()
        bad.data[key] = value
        with pytest.raises(ValueError, match=f"config.data.{key}"):
            config_lib.validate_values(bad)


def test_lima_plans_reach_95_percent_real_tokens(shared_dir):
    c = base_config().data
    c.update(train_path=str(shared_dir / "lima" / "train.jsonl"),
             tokenizer_path=str(shared_dir / "llama" / "tokenizer.model"), seq_len=2048)
    data = P.load_data(c, seed=0)
    for examples_per_step, steps in ((32, 446), (64, 223)):
        plan = P.make_plan(data, examples_per_step, 15, "balanced")
        assert (plan.total_steps, plan.examples) == (steps, len(data.train) * 15)
        assert plan.efficiency >= 0.95, plan.describe_rows()


def test_bucketed_run_has_the_single_shape_run_losses(tmp_path):
    """The same steps (random grouping) on one shape (3 rows) and on two buckets (2 and 3 rows,
    each compiled once by the loop): the padding rows change no loss."""
    from tests.tiny_run import finish, launch, losses

    runs = {}
    for buckets in (1, 2):  # the 3-row step compiles once (a shared cache); unoptimised: 3 steps run little
        finish(launch(tmp_path / str(buckets), tmp_path / "xla", "--config.data.grouping=random",
                      f"--config.data.row_buckets={buckets}", "--config.data.examples_per_step=16",  # 2, 3, 2 rows
                      "--config.model.residual_dropout=0", "--config.train.max_steps=3", fast_compile=True))
        runs[buckets] = losses(tmp_path / str(buckets))
    assert sorted(runs[1]) == [1, 2, 3]
    np.testing.assert_allclose([runs[2][s] for s in (1, 2, 3)], [runs[1][s] for s in (1, 2, 3)], rtol=2e-5)

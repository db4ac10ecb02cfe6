"""data.mixture (lima_jax/data/pipeline.py): sources sampled by weight, exactly examples_per_step
examples a step, the shares of the weights over the run whatever the mesh, the same batches
after a resume; and the config keys' checks."""

import collections
import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from lima_jax.config import base_config, run_config, validate_values
from lima_jax.data import demo, pipeline as P
from lima_jax.errors import ConfigError
from lima_jax.train.program import batch_layout_for
from tests import reader_fixtures as F
from tests.conftest import ROOT
from tests.tiny_run import tiny_config

STEP, EPOCHS = 16, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo's first 150 conversations as LIMA jsonl, the other 50 as OpenAI messages in Parquet."""
    tmp = tmp_path_factory.mktemp("mix")
    conversations = F.demo_conversations()
    return (F.write_jsonl(tmp / "big.jsonl", [F.lima_record(c) for c in conversations[:150]]),
            F.write_parquet(tmp / "small.parquet", [F.openai_record(c) for c in conversations[150:]]))


def mixture_config(files, weights=(3.0, 1.0)):
    config = tiny_config()
    config.data.update(train_path="", seq_len=128, dev_size=10, examples_per_step=STEP,
                       mixture=tuple(zip(files, weights)))
    return config


@pytest.fixture(scope="module")
def data(files):
    return P.load_data(mixture_config(files).data, seed=0)


def run_batches(data, plan):
    return list(P.train_iterator(data, plan))


def test_mixture_steps_and_shares_on_two_meshes(files, data):
    assert data.sources() == {files[0]: 140, files[1]: 50}  # dev (10) held out of the first source
    assert {e["origin"] for e in data.dev} == {0}
    plan = P.make_plan(data, STEP, EPOCHS)
    # an epoch sees the first source once: 140 / (3/4) examples
    assert plan.examples == round(140 / 0.75) * EPOCHS and plan.total_steps == -(-plan.examples // STEP)
    config = mixture_config(files)
    runs = []
    # 8 batch shards with the rows the plan needs; 2 batch shards with more rows (as a user may set)
    for mesh, rows in ((dict(fsdp=-1), -1), (dict(fsdp=2, tensor=4), 8)):
        config.mesh.update(mesh)
        config.data.rows_per_step = rows
        layout = batch_layout_for(run_config(config), plan.rows_needed, jax.devices())
        batches = run_batches(data, P.Plan(**{**plan.__dict__, "rows_per_step": layout.rows}))
        runs.append((layout.rows, batches))
        examples = [int(b["examples"]) for b in batches]
        assert examples == [STEP] * (plan.total_steps - 1) + [plan.last_step_examples]
        by_source = np.sum([b["by_source"] for b in batches], axis=0)
        assert by_source.tolist() == [n for _, n in plan.by_source] and by_source.sum() == plan.examples
        assert abs(by_source[0] / by_source.sum() - 0.75) < 0.02
        assert abs(by_source[0] - 140 * EPOCHS) <= 1
        assert all(abs(int(b["by_source"][0]) - 0.75 * int(b["examples"])) <= 1 for b in batches)  # every step too
    (rows_a, a), (rows_b, b) = runs
    assert rows_a != rows_b
    for x, y in zip(a, b):  # the same examples each step, whatever the rows
        assert x["by_source"].tolist() == y["by_source"].tolist()
        assert sorted(x["tokens"][x["segment_ids"] > 0].tolist()) == sorted(y["tokens"][y["segment_ids"] > 0].tolist())


def test_small_source_repeats_without_replacement_within_a_pass(data):
    plan = P.make_plan(data, STEP, EPOCHS)
    seen = collections.Counter(e["where"] for e in P._examples(data, EPOCHS) if e["origin"] == 1)
    passes, rest = divmod(dict(plan.by_source)[data.inputs[1].path], 50)
    assert len(seen) == 50 and sorted(set(seen.values())) == sorted({passes, passes + 1} if rest else {passes})
    assert sum(v == passes + 1 for v in seen.values()) == rest


def test_mixture_resumes_exactly_and_follows_the_seed(files, data):
    plan = P.make_plan(data, STEP, EPOCHS)
    plan = P.Plan(**{**plan.__dict__, "rows_per_step": plan.rows_needed})
    it = P.train_iterator(data, plan)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    fresh = P.train_iterator(data, plan)
    fresh.set_state(state)
    for x, y in zip(expected, [next(fresh) for _ in range(6)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = P.train_iterator(P.load_data(mixture_config(files).data, seed=1), plan)
    assert not np.array_equal(next(other)["tokens"], next(P.train_iterator(data, plan))["tokens"])


def test_weights_define_the_run(files, data):
    reweighted = P.load_data(mixture_config(files, (1.0, 1.0)).data, seed=0)
    assert reweighted.digest("train") != data.digest("train")
    plan = P.make_plan(reweighted, STEP, EPOCHS)
    assert plan.examples == 280 * EPOCHS and dict(plan.by_source) == {files[0]: 420, files[1]: 420}
    assert f"{files[1]} (openai, detected, weight 1)" in data.describe()
    assert plan.describe_sources() == f"{files[0]} 420 (50.0%), {files[1]} 420 (50.0%)"


PARSE = """
import json
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config")
app.run(lambda _: print(json.dumps(flags.FLAGS.config.data.to_dict())))
"""


def test_mixture_override_from_the_command_line(files, tmp_path):
    """The syntax the README gives, through the flags machinery launch/tpu_train.py uses (on a
    config holding base_config's data defaults, to keep JAX out of the process)."""
    defaults = {k: base_config().data[k] for k in ("train_path", "format", "mixture")}
    (tmp_path / "c.py").write_text(f"import ml_collections\ndef get_config():\n"
                                   f"    return ml_collections.ConfigDict(dict(data={defaults!r}))\n")
    result = subprocess.run(
        [sys.executable, "-c", PARSE, "--config", str(tmp_path / "c.py"), "--config.data.train_path=",
         f"--config.data.mixture=(('{files[0]}', 3.0), ('{files[1]}', 1, 'openai'))"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    data = ml_collections.ConfigDict(json.loads(result.stdout.splitlines()[-1]))
    data.mixture = tuple(map(tuple, data.mixture))  # (JSON made the tuples lists)
    assert P.data_sources(data) == [P.Source(files[0], 3.0, "auto"), P.Source(files[1], 1.0, "openai")]


@pytest.mark.parametrize("mixture, train_path, message", [
    ((("a.jsonl",),), "", r"config\.data\.mixture\[0\]=\('a\.jsonl',\): a tuple of \(path, weight\)"),
    ((("a.jsonl", 0.0), ("b.jsonl", 1.0)), "", r"mixture\[0\].*the weight must be a positive number"),
    ((("a.jsonl", 1.0, "csv"),), "", r"mixture\[0\].*the format must be one of"),
    ((("a.jsonl", 1.0), ("a.jsonl", 2.0)), "", "names a path twice"),
    ((("a.jsonl", 1.0),), "other.jsonl", r"config\.data\.train_path='other\.jsonl' is not in config\.data\.mixture"),
])
def test_bad_mixtures_name_the_key(mixture, train_path, message):
    config = tiny_config()
    config.data.update(mixture=mixture, train_path=train_path)
    with pytest.raises(ConfigError, match=message):
        validate_values(config)


def test_bad_format_names_the_key():
    config = tiny_config()
    config.data.format = "jsonl"
    with pytest.raises(ConfigError, match=r"config\.data\.format='jsonl': one of \['auto', 'lima'"):
        validate_values(config)
    config.data.update(format="lima", train_path=demo.DEMO_TRAIN)
    validate_values(config)

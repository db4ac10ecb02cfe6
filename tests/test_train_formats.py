"""The tiny run trains the same on the demo data whatever it is written in: LIMA jsonl (the
reference), OpenAI-messages jsonl, OpenAI-messages Parquet, a `datasets.save_to_disk` folder of
ShareGPT records and a folder of LIMA Parquet shards give the same per-step losses (dropout off).
All runs share one process (and its compilations)."""

import json
import re
import subprocess
import sys

import numpy as np

from tests import reader_fixtures as F
from tests.conftest import ROOT, cpu_env

RUNS = """
import json, sys
from lima_jax.data import demo
from lima_jax.train import loop
from tests.tiny_run import losses, tiny_config

root, runs = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name, overrides in runs.items():
    config = tiny_config(max_steps=3, checkpoint_every_steps=0, compilation_cache_dir=root + "/cache")
    config.model.residual_dropout = 0.0
    config.data.update(overrides)
    loop.train(config, f"{root}/{name}")
    out[name] = losses(__import__("pathlib").Path(f"{root}/{name}"))
print("LOSSES " + json.dumps(out))
"""


def test_every_input_format_trains_like_lima_jsonl(tmp_path):
    from lima_jax.data import demo

    conversations = F.demo_conversations()
    openai = [F.openai_record(c) for c in conversations]
    runs = {
        "lima": dict(train_path=demo.DEMO_TRAIN),
        "openai_jsonl": dict(train_path=F.write_jsonl(tmp_path / "openai.jsonl", openai)),
        "openai_parquet": dict(train_path=F.write_parquet(tmp_path / "openai.parquet", openai)),
        "saved_sharegpt": dict(train_path=F.write_saved_dataset(tmp_path / "saved",
                                                                [F.sharegpt_record(c) for c in conversations])),
        "parquet_shards": dict(train_path=F.write_parquet_shards(tmp_path / "shards",
                                                                 [F.lima_record(c) for c in conversations])),
    }
    result = subprocess.run([sys.executable, "-c", RUNS, str(tmp_path), json.dumps(runs)], capture_output=True,
                            text=True, cwd=ROOT, env=cpu_env(8, fast_compile=True), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.split("LOSSES ", 1)[1].splitlines()[0])
    reference = [out["lima"][str(step)] for step in (1, 2, 3)]
    assert reference[2] < reference[0]  # it trains
    for name in runs:
        np.testing.assert_allclose([out[name][str(step)] for step in (1, 2, 3)], reference, rtol=1e-6, err_msg=name)
    # the start log says what each input was read as
    for found in ("(lima, detected)", "openai.jsonl (openai, detected)", "openai.parquet (openai, detected)",
                  "saved (sharegpt, detected)", "shards (lima, detected)"):
        assert re.search(re.escape(found) + r": 190 train examples", result.stdout), found

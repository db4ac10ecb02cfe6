"""The tiny run trains the same on the demo data whatever it is written in: LIMA jsonl (the
reference), OpenAI-messages jsonl, OpenAI-messages Parquet, Alpaca jsonl (with `history` for
the dialogues), a `datasets.save_to_disk` folder of ShareGPT records and a folder of LIMA
Parquet shards give the same per-step losses (dropout off);
a mixture resumes exactly. All runs share one process (and its compilations)."""

import json
import re
import subprocess
import sys

import numpy as np

from tests import reader_fixtures as F
from tests.conftest import ROOT, cpu_env

RUNS = """
import json, pathlib, sys
from lima_jax.train import loop
from tests.tiny_run import losses, tiny_config

root, runs = sys.argv[1], json.loads(sys.argv[2])
out = {}
for workdir, data, train in runs:
    config = tiny_config(**{**dict(max_steps=3, checkpoint_every_steps=0, compilation_cache_dir=root + "/cache"), **train})
    config.model.residual_dropout = 0.0
    config.data.update({k: tuple(map(tuple, v)) if k == "mixture" else v for k, v in data.items()})  # JSON gave lists
    loop.train(config, f"{root}/{workdir}")
    out[workdir] = losses(pathlib.Path(f"{root}/{workdir}"))
print("LOSSES " + json.dumps(out))
"""


def test_every_input_format_trains_like_lima_jsonl(tmp_path):
    """Six inputs, then a 3:1 mixture of an OpenAI jsonl and a ShareGPT Parquet file run through
    4 steps, and again stopped after 2 and resumed: the same losses, and the start log counts the
    sources. Every run has the same 8 rows a step, so one compilation serves them all."""
    from lima_jax.data import demo

    conversations = F.demo_conversations()
    openai = [F.openai_record(c) for c in conversations]
    inputs = {
        "lima": demo.DEMO_TRAIN,
        "openai_jsonl": F.write_jsonl(tmp_path / "openai.jsonl", openai),
        "openai_parquet": F.write_parquet(tmp_path / "openai.parquet", openai),
        "alpaca_jsonl": F.write_jsonl(tmp_path / "alpaca.jsonl", [F.alpaca_record(c) for c in conversations]),
        "saved_sharegpt": F.write_saved_dataset(tmp_path / "saved", [F.sharegpt_record(c) for c in conversations]),
        "parquet_shards": F.write_parquet_shards(tmp_path / "shards", [F.lima_record(c) for c in conversations]),
    }
    mixture = dict(train_path="", mixture=[[F.write_jsonl(tmp_path / "a.jsonl", openai[:100]), 3.0],
                                           [F.write_parquet(tmp_path / "b.parquet", [F.sharegpt_record(c) for c in
                                                                                    conversations[100:]]), 1.0]])
    runs = [[name, dict(train_path=path), {}] for name, path in inputs.items()]
    runs += [["mixture", mixture, dict(max_steps=4)], ["mixture_resumed", mixture, dict(max_steps=2, checkpoint_every_steps=2)],
             ["mixture_resumed", mixture, dict(max_steps=4)]]
    result = subprocess.run([sys.executable, "-c", RUNS, str(tmp_path), json.dumps(runs)], capture_output=True,
                            text=True, cwd=ROOT, env=cpu_env(8, fast_compile=True), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.split("LOSSES ", 1)[1].splitlines()[0])
    reference = [out["lima"][str(step)] for step in (1, 2, 3)]
    assert reference[2] < reference[0]  # it trains
    for name in inputs:
        np.testing.assert_allclose([out[name][str(step)] for step in (1, 2, 3)], reference, rtol=1e-6, err_msg=name)
    # the start log says what each input was read as, and a mixture's examples by source
    for found in ("(lima, detected)", "openai.jsonl (openai, detected)", "openai.parquet (openai, detected)",
                  "alpaca.jsonl (alpaca, detected)", "saved (sharegpt, detected)", "shards (lima, detected)"):
        assert re.search(re.escape(found) + r": 190 train examples", result.stdout), found
    assert re.search(r"a\.jsonl \(openai, detected, weight 3\), \S+b\.parquet \(sharegpt, detected, weight 1\): "
                     r"190 train examples", result.stdout)
    assert re.search(r"by source over the run: \S+a\.jsonl \d+ \(75\.0%\), \S+b\.parquet \d+ \(25\.0%\)", result.stdout)
    mixed, resumed = out["mixture"], out["mixture_resumed"]
    assert sorted(resumed) == ["1", "2", "3", "4"] and "resuming from" in result.stdout
    np.testing.assert_allclose([resumed[s] for s in "1234"], [mixed[s] for s in "1234"], rtol=1e-6)

"""metrics.jsonl on resume: what an interrupted run logged after the restored step is dropped."""

import json

from lima_jax.train.metrics import MetricsWriter


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_drops_rows_after_its_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 7):
        writer.write(step, {"loss": 10.0 - step})
    writer.write(4, {"dev_loss": 3.0})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # killed mid-write

    writer = MetricsWriter(tmp_path, start_step=4)  # resumed from the checkpoint of step 4
    writer.write(5, {"loss": 4.5})
    writer.close()
    assert [(r["step"], r.get("loss", r.get("dev_loss"))) for r in rows(tmp_path)] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (4, 3.0), (5, 4.5)]


def test_fresh_run_keeps_nothing_but_its_own_rows(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    MetricsWriter(tmp_path).close()  # start_step 0: a run begun again from scratch
    assert (tmp_path / "metrics.jsonl").read_text() == ""

"""`config.train.select`: at the end of a run, the judge's `select` (lima_jax/evaluation/selection.py)
over the kept epochs' answers to the dev prompts; its summary (the table and the pick), verdicts
and chart go to WORKDIR/select. A rerun of the finished run only judges again, from the cache."""

import os
import tempfile

from lima_jax import storage
from lima_jax.run_config import RunConfig

SELECT_DIR = "select"


def select_epoch(config: RunConfig, workdir) -> dict:
    """Judge the kept epochs of the run in `workdir`; the summary of evaluation.selection.run_select."""
    from lima_jax.evaluation import cache, client
    from lima_jax.evaluation.selection import run_select

    train = config.train
    key = os.environ.get(train.judge_api_key_env)
    settings = client.JudgeSettings(url=train.judge_url, model=train.judge_model, api_key=key or "EMPTY")
    out = storage.path(workdir) / SELECT_DIR
    if storage.is_remote(out):  # the reply cache is appended to: a local file
        cache_path = os.path.join(tempfile.mkdtemp(prefix="lima_select_"), "judge_cache.jsonl")
    else:
        out.mkdir(parents=True, exist_ok=True)
        cache_path = str(out / "judge_cache.jsonl")
    judge = client.Judge(settings, cache.ReplyCache(cache_path), progress=False)
    return run_select(judge, str(workdir), str(out), epochs=train.selected_epochs(), seed=config.seed)

"""Score answers as the LIMA paper did, with a judge model behind any OpenAI-compatible endpoint.

  python launch/judge.py pairwise --answers ours.jsonl --baseline theirs.jsonl \
      --judge_url https://api.openai.com/v1 --judge_model gpt-4o --out judged/ours_vs_theirs
  python launch/judge.py likert --answers ours.jsonl --judge_url URL --judge_model NAME --out judged/likert
  python launch/judge.py select --workdir WORKDIR [--baseline theirs.jsonl] --judge_url URL --judge_model NAME --out judged/select
  python launch/judge.py agreement --human human/ours_vs_theirs [--judge judged/ours_vs_theirs]

The API key is read from the environment variable named by --api_key_env (a local server needs
none). OUT gets summary.json, verdicts.jsonl, chart.png and the reply cache judge_cache.jsonl:
rerunning a command sends only the requests it has no reply for. The judge prompts are
lima_jax/evaluation/prompts/*.txt (or --prompt_file).

`agreement` asks no model: it reports the paper's tie-discounted agreement between the
annotators of launch/annotate.py (HUMAN/human.jsonl) and between them and a pairwise judge run
on the same files (JUDGE/verdicts.jsonl), into HUMAN/summary.json (or OUT/summary.json).
"""

import logging
import os
import sys

from absl import app, flags

from lima_jax import cli

COMMANDS = ("pairwise", "likert", "select", "agreement")

flags.DEFINE_string("answers", None, "answers jsonl to score (launch/sample.py --prompts --output)")
flags.DEFINE_string("baseline", None, "answers jsonl to compare against (pairwise; optional for select)")
flags.DEFINE_string("workdir", None, "training work dir whose dev_samples/ to compare (select)")
flags.DEFINE_list("epochs", [], "select: only these epochs (default: every epoch in dev_samples/)")
flags.DEFINE_string("human", None, "agreement: launch/annotate.py's --out folder (human.jsonl)")
flags.DEFINE_string("judge", None, "agreement: a `pairwise` run's --out folder (verdicts.jsonl)")
flags.DEFINE_string("judge_url", None, "OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
flags.DEFINE_string("judge_model", None, "the judge model's name at that endpoint")
flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "environment variable holding the API key (unset: a dummy key)")
flags.DEFINE_string("out", None, "output folder (summary.json, verdicts.jsonl, chart.png; agreement too)")
flags.DEFINE_string("cache", None, "reply cache, a local jsonl file (default: OUT/judge_cache.jsonl)")
flags.DEFINE_string("prompt_file", None, "judge prompt to use instead of the shipped one")
flags.DEFINE_string("name", None, "label of --answers in the table and chart (default: its file name)")
flags.DEFINE_string("baseline_name", None, "label of --baseline (default: its file name)")
flags.DEFINE_integer("concurrency", 8, "requests in flight at once")
flags.DEFINE_integer("max_attempts", 6, "tries per request on 429, 5xx and connection errors")
flags.DEFINE_float("backoff_s", 1.0, "first wait before a retry; doubled each time")
flags.DEFINE_float("max_backoff_s", 60.0, "longest wait between retries")
flags.DEFINE_float("timeout_s", 300.0, "per request")
flags.DEFINE_bool("logprobs", True, "read verdicts from token log-probabilities when the endpoint returns them")
flags.DEFINE_integer("top_logprobs", 20, "alternatives per token to ask for")
flags.DEFINE_integer("max_tokens", 4, "reply length limit (the verdict is one character)")
flags.DEFINE_float("temperature", 0.0, "0: greedy")
flags.DEFINE_integer("resamples", 10_000, "bootstrap resamples for the confidence intervals")
flags.DEFINE_integer("seed", 0, "bootstrap seed")
flags.DEFINE_bool("progress", True, "show a progress bar")
FLAGS = flags.FLAGS


def main(argv):
    from lima_jax.evaluation import cache, client, report

    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request would bury the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = _command(argv)
    if command == "agreement":
        from lima_jax.evaluation.agreement import run_agreement

        _require("human")
        result = run_agreement(FLAGS.human, FLAGS.judge, FLAGS.out)
        print(f"{result['printed']}\n\n-> {result['written']}")
        return
    _require("judge_url", "judge_model", "out")
    key = os.environ.get(FLAGS.api_key_env)
    if not key:
        print(f"${FLAGS.api_key_env} is not set: sending a dummy API key (fine for a local server)", file=sys.stderr)
    settings = client.JudgeSettings(
        url=FLAGS.judge_url, model=FLAGS.judge_model, api_key=key or "EMPTY", temperature=FLAGS.temperature,
        max_tokens=FLAGS.max_tokens, logprobs=FLAGS.logprobs, top_logprobs=FLAGS.top_logprobs,
        concurrency=FLAGS.concurrency, max_attempts=FLAGS.max_attempts, backoff_s=FLAGS.backoff_s,
        max_backoff_s=FLAGS.max_backoff_s, timeout_s=FLAGS.timeout_s)
    cache_path = FLAGS.cache or _default_cache(FLAGS.out)
    judge = client.Judge(settings, cache.ReplyCache(cache_path), progress=FLAGS.progress)
    summary = _run(command, judge)
    print(summary["printed"])
    requests = summary["requests"]
    print(f"\n{requests['sent']} requests sent ({requests['retries']} retries), {requests['answered_from_cache']} "
          f"answered from {cache_path}; {FLAGS.out}/{report.SUMMARY}, {report.VERDICTS}, {report.CHART}")


def _command(argv) -> str:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command: {' | '.join(COMMANDS)} (got {argv[1:]})")
    return argv[1]


def _default_cache(out: str) -> str:
    if "://" in out:
        raise app.UsageError("--out is in a bucket: pass --cache with a local file for the reply cache")
    return os.path.join(out, "judge_cache.jsonl")


def _run(command: str, judge) -> dict:
    common = dict(out=FLAGS.out, prompt_file=FLAGS.prompt_file, resamples=FLAGS.resamples, seed=FLAGS.seed)
    if command == "pairwise":
        from lima_jax.evaluation.pairwise import run_pairwise

        _require("answers", "baseline")
        return run_pairwise(judge, FLAGS.answers, FLAGS.baseline, name=FLAGS.name, baseline_name=FLAGS.baseline_name,
                            **common)
    if command == "likert":
        from lima_jax.evaluation.likert import run_likert

        _require("answers")
        return run_likert(judge, FLAGS.answers, name=FLAGS.name, **common)
    from lima_jax.evaluation.selection import run_select

    _require("workdir")
    return run_select(judge, FLAGS.workdir, baseline_path=FLAGS.baseline, epochs=[int(e) for e in FLAGS.epochs],
                      **common)


def _require(*names: str) -> None:
    missing = [f"--{n}" for n in names if not getattr(FLAGS, n)]
    if missing:
        raise app.UsageError(f"this command needs {', '.join(missing)}")


if __name__ == "__main__":
    cli.run(main)

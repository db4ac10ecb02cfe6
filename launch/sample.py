"""Answer prompts with a checkpoint, or from any OpenAI-compatible endpoint: LIMA's decoding by
default (p=0.9, t=0.7, penalty 1.2).

  python launch/sample.py --checkpoint WORKDIR_OR_CKPT --prompt "How do I ...?"
  python launch/sample.py --checkpoint CKPT --prompts test.jsonl --output answers.jsonl [--resume | --overwrite]
  python launch/sample.py --checkpoint CKPT --format raw --greedy --prompt "The capital of France is"
  python launch/sample.py --endpoint https://api.openai.com/v1 --model gpt-4o --prompts test.jsonl --output gpt4o.jsonl \
      --repetition_penalty 1.0

`--endpoint` takes the answers from any OpenAI-compatible endpoint instead (a baseline model, or
launch/serve.py), in the same answers-file format, with the same decoding flags (the repetition
penalty and top-k are sent as body extensions: 1.0 and 0 leave them out, as OpenAI's own API
needs), the same --resume/--overwrite rules, and the judge's client: concurrent requests,
retries with backoff and a reply cache (--cache, default OUTPUT.cache.jsonl) that a rerun answers
from. The API key is read from the variable --api_key_env names.

`--config FILE` is optional: the config saved in the checkpoint is used otherwise (overrides
such as `--config.mesh.tensor=2` need `--config`). `--checkpoint` takes one step folder, a
checkpoint root (its latest step) or a training work dir.

With `--prompts`, the output location is checked before the model loads; `--batch_size`
prompts are decoded together and a finished answer's slot takes the next prompt at once
(continuous batching); answers are appended to `--output` in file order as they finish. An existing output is refused unless `--overwrite`
(start over) or `--resume` (answer only the prompts after those it holds: an interrupted run
continues where it stopped, and the file ends as an uninterrupted run's would).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lima_jax import cli
from lima_jax.sampling.decoding import LIMA

config_flags.DEFINE_config_file("config", None, "config file (optional: read from the checkpoint)")
flags.DEFINE_string("checkpoint", None, "checkpoint step, checkpoint root or training work dir")
flags.DEFINE_string("endpoint", None, "OpenAI-compatible base URL to answer --prompts from instead of a checkpoint")
flags.DEFINE_string("model", None, "the model's name at --endpoint")
flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "environment variable holding --endpoint's API key (unset: a dummy)")
flags.DEFINE_string("cache", None, "--endpoint's reply cache, a local jsonl file (default: OUTPUT.cache.jsonl)")
flags.DEFINE_integer("concurrency", 8, "--endpoint: requests in flight at once")
flags.DEFINE_integer("max_attempts", 6, "--endpoint: tries per request on 429, 5xx and connection errors")
flags.DEFINE_float("backoff_s", 1.0, "--endpoint: first wait before a retry; doubled each time")
flags.DEFINE_float("timeout_s", 600.0, "--endpoint: per request")
flags.DEFINE_string("prompt", None, "one user message (answered with streaming output)")
flags.DEFINE_multi_string("turn", [], "earlier turns of a multi-turn conversation, in order, before --prompt")
flags.DEFINE_string("prompts", None, "LIMA-format jsonl file to answer")
flags.DEFINE_string("output", None, "answers jsonl (with --prompts)")
flags.DEFINE_bool("overwrite", False, "replace an existing --output")
flags.DEFINE_bool("resume", False, "continue an existing --output after the prompts it already answers")
flags.DEFINE_enum("format", None, ["lima", "llama3", "chatml", "raw"],
                  "the chat format (default: the checkpoint's, as in training); raw: BOS + text, for base models")
flags.DEFINE_string("system", None, "a system message (llama3 and chatml formats)")
flags.DEFINE_bool("greedy", LIMA.greedy, "argmax decoding (the repetition penalty still applies)")
flags.DEFINE_integer("max_new_tokens", LIMA.max_new_tokens, "answer length limit")
flags.DEFINE_float("temperature", LIMA.temperature, "")
flags.DEFINE_float("top_p", LIMA.top_p, "")
flags.DEFINE_integer("top_k", LIMA.top_k, "0 = off")
flags.DEFINE_float("repetition_penalty", LIMA.repetition_penalty, "1.0 = off")
flags.DEFINE_bool("penalize_prompt", LIMA.penalize_prompt, "count prompt tokens as seen for the repetition penalty (HF style)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("batch_size", 8, "prompts decoded together with --prompts (a finished one's slot takes the next)")
flags.DEFINE_string("tokenizer", None, "tokenizer.model, tokenizer.json or a folder holding one (default: the "
                    "one stored in the checkpoint)")
flags.DEFINE_bool("stream", True, "print tokens as they come (with --prompt)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO
    from lima_jax.sampling.answers import check_output
    from lima_jax.sampling.decoding import SamplingSettings
    from lima_jax.sampling.sampler import answer_file, load_sampler

    if (FLAGS.checkpoint is None) == (FLAGS.endpoint is None):
        raise app.UsageError("give exactly one of --checkpoint or --endpoint")
    if (FLAGS.prompt is None) == (FLAGS.prompts is None):
        raise app.UsageError("give exactly one of --prompt or --prompts")
    if FLAGS.prompts and not FLAGS.output:
        raise app.UsageError("--prompts needs --output")
    if FLAGS.endpoint and not (FLAGS.prompts and FLAGS.model):
        raise app.UsageError("--endpoint answers a --prompts file and needs --model")
    if FLAGS.prompts:
        check_output(FLAGS.output, FLAGS.overwrite, FLAGS.resume, FLAGS.prompts)  # before the model loads
    settings = SamplingSettings(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                                repetition_penalty=FLAGS.repetition_penalty, penalize_prompt=FLAGS.penalize_prompt,
                                greedy=FLAGS.greedy, max_new_tokens=FLAGS.max_new_tokens)
    if FLAGS.endpoint:
        return _from_endpoint(settings)
    sampler, _ = load_sampler(FLAGS.checkpoint, FLAGS.config, FLAGS.tokenizer)
    if FLAGS.prompts:
        summary = answer_file(sampler, FLAGS.prompts, FLAGS.output, settings, FLAGS.batch_size, FLAGS.seed,
                              FLAGS.format, overwrite=FLAGS.overwrite, resume=FLAGS.resume)
        print(f"{summary['prompts']} answers -> {FLAGS.output} ({summary['resumed']} resumed, "
              f"{summary['answer_tokens']} new tokens, "
              f"{summary['tokens_per_second']:.1f} tokens/s)")
        return
    stream = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if FLAGS.stream else None
    out = sampler.answer(FLAGS.turn + [FLAGS.prompt], settings, FLAGS.seed, FLAGS.format, stream=stream,
                         system=FLAGS.system)
    if not FLAGS.stream:
        sys.stdout.write(out["answer"])
    print(f"\n[{out['prompt_tokens']} prompt tokens, {out['answer_tokens']} answer tokens, "
          f"{'stopped' if out['stopped'] else 'hit max_new_tokens'}]", file=sys.stderr)


def _from_endpoint(settings) -> None:
    import os

    from lima_jax.evaluation import cache, client
    from lima_jax.sampling.endpoint import answer_file_at_endpoint

    endpoint = client.JudgeSettings(url=FLAGS.endpoint, model=FLAGS.model, api_key=os.environ.get(FLAGS.api_key_env)
                                    or "EMPTY", concurrency=FLAGS.concurrency, max_attempts=FLAGS.max_attempts,
                                    backoff_s=FLAGS.backoff_s, timeout_s=FLAGS.timeout_s, role="endpoint")
    cache_path = FLAGS.cache or f"{FLAGS.output}.cache.jsonl"
    asker = client.Judge(endpoint, cache.ReplyCache(cache_path), progress=False)
    summary = answer_file_at_endpoint(asker, FLAGS.prompts, FLAGS.output, settings, FLAGS.seed,
                                      overwrite=FLAGS.overwrite, resume=FLAGS.resume)
    print(f"{summary['prompts']} answers -> {FLAGS.output} ({summary['resumed']} resumed, {summary['sent']} requests "
          f"sent ({summary['retries']} retries), {summary['answered_from_cache']} answered from {cache_path})")


if __name__ == "__main__":
    cli.run(main)

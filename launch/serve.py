"""Serve a checkpoint over OpenAI's API (chat and completions, streaming, logprobs).

  python launch/serve.py --checkpoint WORKDIR_OR_CKPT [--port 8000] [--slots 16]

Then point any OpenAI client at it:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(
      model="...", messages=[{"role": "user", "content": "..."}])

LIMA's decoding is the default (top_p 0.9, temperature 0.7, repetition penalty 1.2); a
request's `temperature: 0` is greedy; `repetition_penalty` is an extra body field. A
`system` message is refused (LIMA has no system role). `--slots` requests are decoded
together; more wait for a free slot. Several processes: run the same command on every
process (with `--coordinator_address`, `--num_processes`, `--process_id` off TPU pods);
process 0 serves HTTP.

`--api_key_env VAR` requires `Authorization: Bearer $VAR` on every route but /health (a TPU VM
is usually reached over its network); `--max_body_mb` caps request bodies (413 past it).
lm-evaluation-harness: `lm_eval --model local-completions --model_args
base_url=http://127.0.0.1:8000/v1/completions,model=NAME --tasks ...` (it finds the server's
tokenizer routes by itself; `/metrics` has Prometheus counters).
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from lima_jax import cli
from lima_jax.errors import ConfigError

config_flags.DEFINE_config_file("config", None, "config file (optional: read from the checkpoint)")
flags.DEFINE_string("checkpoint", None, "checkpoint step, checkpoint root or training work dir", required=True)
flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
flags.DEFINE_integer("port", 8000, "port to listen on")
flags.DEFINE_integer("slots", 16, "requests decoded together (rounded up to the mesh's batch shards)")
flags.DEFINE_integer("prefix_cache_mib", 0, "device memory (MiB) for the prefix cache: prompts that start with "
                     "already prefilled tokens reuse their keys and values (0: off; use in /health)")
flags.DEFINE_string("model_name", None, "the model id clients see (default: from the checkpoint path)")
flags.DEFINE_string("tokenizer", None, "tokenizer.model, tokenizer.json or a folder (default: the checkpoint's)")
flags.DEFINE_string("api_key_env", None, "name of an environment variable holding the API key clients must send "
                    "as 'Authorization: Bearer KEY' (default: no key)")
flags.DEFINE_float("max_body_mb", 8, "largest request body accepted, in MiB (413 past it)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs off TPU pods")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    api_key = None
    if FLAGS.api_key_env:
        api_key = os.environ.get(FLAGS.api_key_env, "")
        if not api_key:
            raise ConfigError(f"--api_key_env={FLAGS.api_key_env}: that environment variable is unset or empty")
    if FLAGS.max_body_mb <= 0:
        raise ConfigError(f"--max_body_mb={FLAGS.max_body_mb}: give a positive size")
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO
    import jax

    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # TPU pod: everything is discovered from the environment

    from lima_jax.serving.server import build_engine, model_name_from_path, serve

    engine = build_engine(FLAGS.checkpoint, FLAGS.config, FLAGS.tokenizer, FLAGS.slots,
                          prefix_cache_mib=FLAGS.prefix_cache_mib)
    serve(engine, FLAGS.model_name or model_name_from_path(FLAGS.checkpoint), FLAGS.host, FLAGS.port, api_key,
          int(FLAGS.max_body_mb * 2**20))


if __name__ == "__main__":
    cli.run(main)

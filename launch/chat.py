"""Chat with a checkpoint in the terminal: multi-turn, answers streamed as they are decoded.

  python launch/chat.py --checkpoint WORKDIR_OR_CKPT [--greedy] [--max_new_tokens 512]

Type a message and Enter; `/reset` forgets the conversation, `/exit` (or Ctrl-D) leaves.
LIMA's decoding by default (p=0.9, t=0.7, repetition penalty 1.2). To compare the epochs
kept for selection, run it on each `WORKDIR/checkpoints/STEP`.
"""

from absl import flags, logging
from ml_collections import config_flags

from lima_jax import cli
from lima_jax.sampling.decoding import LIMA

config_flags.DEFINE_config_file("config", None, "config file (optional: read from the checkpoint)")
flags.DEFINE_string("checkpoint", None, "checkpoint step, checkpoint root or training work dir", required=True)
flags.DEFINE_bool("greedy", LIMA.greedy, "argmax decoding (the repetition penalty still applies)")
flags.DEFINE_integer("max_new_tokens", 512, "answer length limit")
flags.DEFINE_float("temperature", LIMA.temperature, "")
flags.DEFINE_float("top_p", LIMA.top_p, "")
flags.DEFINE_float("repetition_penalty", LIMA.repetition_penalty, "1.0 = off")
flags.DEFINE_integer("seed", 0, "sampling seed (turn k uses seed + k)")
flags.DEFINE_string("tokenizer", None, "tokenizer.model, tokenizer.json or a folder (default: the checkpoint's)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO
    from lima_jax.sampling.decoding import SamplingSettings
    from lima_jax.sampling.sampler import load_sampler
    from lima_jax.serving.chat import Conversation, chat_loop

    settings = SamplingSettings(temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                                repetition_penalty=FLAGS.repetition_penalty, greedy=FLAGS.greedy,
                                max_new_tokens=FLAGS.max_new_tokens)
    sampler, _ = load_sampler(FLAGS.checkpoint, FLAGS.config, FLAGS.tokenizer)
    sampler.prompt_ids("", "lima")  # a base model is refused now, not at the first message
    chat_loop(Conversation(sampler, settings, FLAGS.seed))


if __name__ == "__main__":
    cli.run(main)

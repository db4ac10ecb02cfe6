"""Chat with a checkpoint in the terminal: multi-turn, answers streamed as they are decoded.

  python launch/chat.py --checkpoint WORKDIR_OR_CKPT [--greedy] [--max_new_tokens 512] [--system TEXT]

Type a message and Enter; `/reset` forgets the conversation, `/exit` (or Ctrl-D) leaves.
LIMA's decoding by default (p=0.9, t=0.7, repetition penalty 1.2). To compare the epochs
kept for selection, run it on each `WORKDIR/checkpoints/STEP`.

Prompts are written in the checkpoint's chat format (`lima`, `llama3`, `chatml`); `--system`
opens every conversation (kept by `/reset`) with a system message in that format. LIMA's
format has no system role: `--system` with a `lima` checkpoint is refused before the chat
starts (put the instructions in the first message instead). Answers end at the format's
end-of-turn token (`<|eot_id|>`, `<|im_end|>`, LIMA's EOT) or EOS.
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
flags.DEFINE_string("system", None, "a system message opening the chat (llama3 and chatml checkpoints; lima has none)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO
    from lima_jax import model_store
    from lima_jax.data import chat_format
    from lima_jax.errors import ConfigError
    from lima_jax.sampling.decoding import SamplingSettings
    from lima_jax.sampling.sampler import load_sampler
    from lima_jax.serving.chat import Conversation, chat_loop

    settings = SamplingSettings(temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                                repetition_penalty=FLAGS.repetition_penalty, greedy=FLAGS.greedy,
                                max_new_tokens=FLAGS.max_new_tokens)
    fmt = model_store.read_meta(FLAGS.checkpoint).chat_format or model_store.LIMA_FORMAT  # as load_sampler reads it
    if FLAGS.system is not None and not chat_format.HAS_SYSTEM[fmt]:  # refused before the model loads
        raise ConfigError(f"--system: this checkpoint speaks the {fmt!r} chat format, which has no system role "
                          "(LIMA trains without one): put the instructions in your first message instead")
    sampler, _ = load_sampler(FLAGS.checkpoint, FLAGS.config, FLAGS.tokenizer)
    chat_loop(Conversation(sampler, settings, FLAGS.seed, FLAGS.system))  # a base model is refused here


if __name__ == "__main__":
    cli.run(main)

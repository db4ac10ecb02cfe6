"""A web page for the paper's human preference study: one prompt at a time, two answers (A's and
the baseline's) in an order random per prompt and per annotator, names hidden; buttons and keys
for "answer 1 is better" / "tie" / "answer 2 is better"; each annotator by name, resuming where
they stopped. Every verdict is appended to OUT/human.jsonl as it is given, as A's outcome
(win / tie / loss against B), whatever order it was shown in.

  python launch/annotate.py --answers ours.jsonl --baseline theirs.jsonl --out human/ours_vs_theirs [--port 8080]

Then open http://127.0.0.1:8080 (--host 0.0.0.0 to let others in). The answers files are
sample.py's (--checkpoint or --endpoint), paired by prompt. Agreement between annotators and
with the judge: `python launch/judge.py agreement --human OUT --judge JUDGED_DIR`.
"""

import logging

from absl import flags

from lima_jax import cli

flags.DEFINE_string("answers", None, "answers jsonl A (its outcome is recorded: win, tie, loss)", required=True)
flags.DEFINE_string("baseline", None, "answers jsonl B, the baseline", required=True)
flags.DEFINE_string("out", None, "folder for human.jsonl and session.json", required=True)
flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
flags.DEFINE_integer("port", 8080, "port to listen on")
flags.DEFINE_string("seed", None, "seed of the shown orders (default: a random one, kept in OUT/session.json)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import uvicorn

    from lima_jax.evaluation.annotate_app import create_app
    from lima_jax.evaluation.human import Annotation

    annotation = Annotation(FLAGS.answers, FLAGS.baseline, FLAGS.out, FLAGS.seed)
    logging.warning("annotating %d prompts on http://%s:%d (verdicts: %s)", len(annotation.pairs), FLAGS.host,
                    FLAGS.port, annotation.path)
    uvicorn.run(create_app(annotation), host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
    cli.run(main)

"""Does a config fit a TPU slice? Compile its train step for the topology, here, without TPUs.

  python launch/aot_check.py --config configs/llama65b.py --topology v4-64 \
      --config.train.opt_state_memory=pinned_host \
      --config.data.train_path=lima/train.jsonl --config.data.tokenizer_path=tokenizer.model

Prints per-device memory against HBM (and host memory, with the optimizer state offloaded),
FLOPs per step and the verdict; exits 0 when it fits, 1 when it does not (with the compiler's
message). Needs `libtpu` (pip install libtpu).
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU topology, run nothing

from absl import flags
from ml_collections import config_flags

from lima_jax import cli

config_flags.DEFINE_config_file("config", None, "ml-collections config file.", lock_config=True)
flags.DEFINE_string("topology", None, "Slice name: v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips).")
flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
flags.DEFINE_bool("train", True, "Compile the train step.")
flags.DEFINE_bool("decode", True, "Also compile the decode step serve.py and sample.py run.")
flags.DEFINE_integer("slots", None, "Slots of the decode step (serve.py's --slots; default its default).")
flags.DEFINE_string("json", None, "Also write the report(s) as JSON here.")
flags.mark_flags_as_required(["config", "topology"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from lima_jax.aot import check_decode_step, check_train_step, format_report

    checks = [("train", check_train_step)] * FLAGS.train + [("decode", check_decode_step)] * FLAGS.decode
    reports, fits = [], True
    for name, check in checks:
        try:
            extra = {"num_slots": FLAGS.slots} if name == "decode" else {}
            report = check(FLAGS.config, FLAGS.topology, FLAGS.num_slices, **extra)
        except Exception as e:  # the compiler's RESOURCE_EXHAUSTED is the answer, not a crash
            if "RESOURCE_EXHAUSTED" not in str(e) and "exceeds" not in str(e):
                raise
            print(f"{name} step on {FLAGS.topology}: DOES NOT FIT\n{e}", file=sys.stderr)
            fits = False
            continue
        print(format_report(report) + "\n")
        reports.append(report)
        fits = fits and report["fits"]
    if FLAGS.json:
        from lima_jax import storage

        storage.path(FLAGS.json).write_text(json.dumps(reports, indent=2))
    return 0 if fits else 1


if __name__ == "__main__":
    cli.run(main)  # main's return value is the exit status

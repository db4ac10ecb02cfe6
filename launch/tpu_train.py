"""Run the LIMA SFT job: python launch/tpu_train.py --config configs/llama65b.py --workdir DIR

On a TPU pod run the same command on every worker (launch/pod_run.sh); `jax.distributed`
is initialised automatically there. For several CPU/GPU processes pass the coordinator
flags. Any config value can be overridden: --config.train.epochs=10.

--plan_only prints the plan (steps, examples a step, row shapes, real-token share, batch layout
over this machine's devices) and exits before anything is restored or compiled.
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from lima_jax import cli

config_flags.DEFINE_config_file("config", "configs/tiny.py", "ml-collections config file.")
flags.DEFINE_string("workdir", "workdir/tiny", "Work dir (local or gs://): checkpoints, metrics, config.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs off TPU pods.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool("plan_only", False, "Print the plan and exit: nothing is restored, compiled or trained.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    import jax

    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # TPU pod: everything is discovered from the environment

    from lima_jax.train import loop

    if FLAGS.plan_only:
        print_plan(loop.prepare(FLAGS.config, FLAGS.workdir))
        return
    loop.train(FLAGS.config, FLAGS.workdir)


def print_plan(run) -> None:
    """The run's plan as the loop logs it, then one line of key=value for scripts."""
    from lima_jax.train import loop

    loop.log_plan(run)
    plan = run.plan
    loop.log(f"plan_only: steps={plan.total_steps} examples_per_step={plan.examples_per_step} "
             f"row_shapes={'/'.join(map(str, plan.shapes))}x{plan.seq_len} rows_per_step={plan.rows_per_step} "
             f"real_token_share={100 * plan.efficiency:.1f}%")


if __name__ == "__main__":
    cli.run(main)

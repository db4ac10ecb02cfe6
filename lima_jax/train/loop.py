"""The LIMA SFT run: mesh, data, state (fresh, converted or resumed), the step loop,
per-epoch checkpoints with dev loss and sampled dev answers, and clean stops.

Read top to bottom, `train(config, workdir)` is the whole job; each piece it calls lives in
its own module (model, data, step, optimizer, checkpoint, metrics).
"""

import json
import signal
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lima_jax import checkpoint as ckpt
from lima_jax import config as config_lib
from lima_jax.data import pipeline
from lima_jax.model import flops_per_token, init_params
from lima_jax.sharding import make_mesh, num_slices
from lima_jax.train.metrics import MetricsWriter, peak_flops_per_device
from lima_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lima_jax.train.step import (TrainState, abstract_train_state, compile_step, compiler_options, make_eval_step,
                                 make_train_step)


class NonFiniteLoss(RuntimeError):
    pass


def train(config, workdir) -> TrainState:
    workdir = ckpt.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_cfg = config_lib.validate(config, jax.device_count(), num_slices(jax.devices()))
    if config.train.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(epath.Path(config.train.compilation_cache_dir).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    mesh = make_mesh(config.mesh)
    log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)")
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        log("effective config:\n" + str(config))

    epochs = config.train.epochs
    data = pipeline.load_data(config.data, config.seed)
    plan = pipeline.make_plan(data, config.data, epochs,
                              batch_multiple=mesh.shape["data"] * mesh.shape["fsdp"] * config.train.grad_accum_steps)
    total_steps = plan.total_steps
    log(f"{len(data.train)} train / {len(data.dev)} dev examples ({data.stats}); {total_steps} steps over "
        f"{epochs} epochs, {plan.rows_per_step} rows x {plan.seq_len} tokens a step, "
        f"{100 * plan.efficiency:.1f}% real tokens")
    train_iter = pipeline.train_iterator(data, plan)
    dev_batches = pipeline.dev_batches(data, plan)
    batch_sharding = pipeline.batch_sharding(mesh)

    schedule = learning_rate_schedule(config.optimizer, total_steps)
    optimizer = make_optimizer(config.optimizer, total_steps)
    abstract_state, state_shardings = abstract_train_state(model_cfg, optimizer, mesh)
    replicated = state_shardings.step

    # Packing streams across epoch boundaries, so an epoch "ends" at its share of the steps.
    epoch_ends = [round(total_steps * e / epochs) for e in range(1, epochs + 1)]
    keep = [epoch_ends[e - 1] for e in config.train.keep_epochs if 0 < e <= epochs]
    manager = ckpt.manager(workdir / ckpt.CHECKPOINTS_SUBDIR, keep_steps=keep,
                           async_save=config.train.async_checkpointing)
    state = restore_or_init(config, model_cfg, manager, train_iter, abstract_state, state_shardings, optimizer)
    start = int(state.step)

    train_step = jax.jit(make_train_step(model_cfg, optimizer, schedule, config.train.grad_accum_steps),
                         in_shardings=(state_shardings, batch_sharding, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=0,
                         compiler_options=compiler_options())
    eval_step = jax.jit(make_eval_step(model_cfg), in_shardings=(state_shardings.params, batch_sharding))
    dropout_key = jax.random.key(config.seed + 1)  # the init key is config.seed

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    writer = MetricsWriter(workdir, start)
    flops_per_real_token = flops_per_token(model_cfg, config.data.seq_len)
    peak = peak_flops_per_device(override=config.train.peak_flops_per_device)
    progress = progress_bar(start, total_steps)
    last_time, pending, compiled_step = time.perf_counter(), [], None
    try:
        with jax.set_mesh(mesh):
            for step in range(start, total_steps):
                if 0 < config.train.max_steps <= step:
                    break
                batch = pipeline.global_batch(next(train_iter), mesh)
                profile(config.train.profile_steps, step, workdir)
                if compiled_step is None:  # every batch has the first one's shapes and shardings
                    compiled_step = compile_step(train_step, state, batch, dropout_key)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = compiled_step(state, batch, dropout_key)
                pending.append(metrics)
                done = step + 1
                if done % config.train.log_every_steps == 0 or done in epoch_ends or done == total_steps:
                    rows = jax.device_get(pending)  # the only host round trip: metrics
                    now = time.perf_counter()
                    step_time = (now - last_time) / len(rows)
                    last_time, pending = now, []
                    for offset, row in enumerate(rows):
                        if not np.isfinite(row["loss"]):
                            raise NonFiniteLoss(f"loss is {row['loss']} at step {done - len(rows) + offset + 1}; "
                                                f"stopping. The last good checkpoint is kept in {manager.directory}")
                    row = rows[-1]
                    tokens_per_s = float(row["real_tokens"]) / step_time
                    report = dict(row, step_time=step_time, tokens_per_s=tokens_per_s)
                    if peak:
                        report["mfu"] = flops_per_real_token * tokens_per_s / (peak * jax.device_count())
                    writer.write(done, report)
                    progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}")
                progress.update(1)
                if done in epoch_ends or (config.train.checkpoint_every_steps
                                          and done % config.train.checkpoint_every_steps == 0):
                    save(manager, done, state, train_iter, model_cfg, config)
                if done in epoch_ends and config.train.eval_every_epoch:
                    epoch = epoch_ends.index(done) + 1
                    dev = evaluate(eval_step, state.params, dev_batches, mesh)
                    writer.write(done, {"epoch": epoch, **dev})
                    log(f"epoch {epoch}: dev loss {dev['dev_loss']:.4f}, perplexity {dev['dev_perplexity']:.2f}")
                    sample_dev_answers(config, model_cfg, state.params, data, mesh, workdir, done, epoch)
                if stop_requested(stop["signal"] is not None, done, config.train.log_every_steps):
                    log(f"signal {stop['signal'] or 'on another process'}: saving step {done} and exiting")
                    save(manager, done, state, train_iter, model_cfg, config)
                    break
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        progress.close()
        signal.signal(signal.SIGTERM, previous)
    return state


def stop_requested(local: bool, step: int, every: int) -> bool:
    """Whether any process got SIGTERM. Saving is collective, so every process must stop at the
    same step: with several processes the flags are combined at logging steps only (one tiny
    all-gather), so no extra host round trip is added to every step."""
    if jax.process_count() == 1:
        return local
    if step % every:
        return False
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(local)).max())


def restore_or_init(config, model_cfg, manager, train_iter, abstract_state, shardings, optimizer) -> TrainState:
    """Resume from the work dir's latest complete checkpoint, else start from
    `config.init_checkpoint` (converted weights) or from a random init."""
    step = manager.latest_step()
    if step is not None:
        log(f"resuming from {manager.directory}/{step}")
        restored = manager.restore(step, args=ocp.args.Composite(**{
            ckpt.PARAMS: ocp.args.StandardRestore(ckpt.target_tree(abstract_state.params, shardings.params)),
            ckpt.OPT_STATE: ocp.args.StandardRestore(ckpt.target_tree(abstract_state.opt_state, shardings.opt_state)),
            ckpt.DATA_ITER: grain.checkpoint.CheckpointRestore(train_iter),  # restores in place
        }))
        return TrainState(jax.device_put(jnp.int32(step), shardings.step), restored[ckpt.PARAMS],
                          restored[ckpt.OPT_STATE])
    if config.init_checkpoint:
        log(f"initial weights from {config.init_checkpoint}")
        params = ckpt.restore_params(config.init_checkpoint, abstract_state.params, shardings.params)
    else:
        log("initial weights: random (set config.init_checkpoint to fine-tune converted weights)")
        params = jax.jit(init_params, static_argnums=0, out_shardings=shardings.params)(
            model_cfg, jax.random.key(config.seed))
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    return TrainState(jax.device_put(jnp.int32(0), shardings.step), params, opt_state)


def save(manager, step, state, train_iter, model_cfg, config):
    if manager.latest_step() == step:
        return
    meta = ckpt.CheckpointMeta(model=dict(model_cfg.__dict__), step=step, eot_id=model_cfg.vocab_size - 1,
                               config=json.loads(config.to_json_best_effort()), source={"from": "train"})
    manager.save(step, args=ocp.args.Composite(**{
        ckpt.PARAMS: ocp.args.StandardSave(state.params),
        ckpt.OPT_STATE: ocp.args.StandardSave(state.opt_state),
        ckpt.DATA_ITER: grain.checkpoint.CheckpointSave(train_iter),
        ckpt.META: ocp.args.JsonSave(meta.to_json()),
    }))


def evaluate(eval_step, params, dev_batches, mesh) -> dict:
    total = count = 0.0
    for batch in dev_batches:
        t, c = eval_step(params, pipeline.global_batch(batch, mesh))
        total, count = total + float(t), count + float(c)
    loss = total / max(count, 1.0)
    return {"dev_loss": loss, "dev_perplexity": float(np.exp(loss))}


def sample_dev_answers(config, model_cfg, params, data, mesh, workdir, step, epoch):
    """Answers to the first few dev prompts with LIMA's decoding, written next to the epoch's
    checkpoint so a person can read epochs 5-10 side by side."""
    n = config.train.sample_dev_prompts
    if n <= 0:
        return
    from lima_jax.sampling.sampler import Sampler  # sampling is optional for training
    from lima_jax.sampling.transforms import SamplingSettings

    sampler = Sampler(model_cfg, params, data.tokenizer, mesh)
    prompts = pipeline.dev_prompts(data, n)
    outs = sampler.generate_ids([sampler.prompt_ids(p) for p in prompts],
                                SamplingSettings(max_new_tokens=config.train.sample_max_new_tokens), seed=config.seed)
    rows = [dict(epoch=epoch, step=step, prompt=p[-1], answer=data.tokenizer.decode(o["ids"]),
                 answer_tokens=len(o["ids"]), stopped=o["stopped"]) for p, o in zip(prompts, outs)]
    if jax.process_index() == 0:
        out = workdir / "dev_samples" / f"epoch{epoch:02d}_step{step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for row in rows:
        log(f"epoch {epoch} sample | {row['prompt'][:80]!r} -> {row['answer'][:160]!r}")


def profile(profile_steps, step, workdir):
    """A JAX profiler trace of steps [first, last) into WORKDIR/profile (TensorBoard's profile tab)."""
    if len(profile_steps) == 2 and step == profile_steps[0]:
        jax.profiler.start_trace(str(workdir / "profile"))
    elif len(profile_steps) == 2 and step == profile_steps[1]:
        jax.profiler.stop_trace()


def progress_bar(start, total):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", disable=jax.process_index() != 0, dynamic_ncols=True)


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[lima_jax] {message}", flush=True)

"""The LIMA SFT run: validate and plan, build the train program, resume or start, then the
step loop with per-epoch checkpoints, dev loss and sampled dev answers, and clean stops.

Read top to bottom, `train(config, workdir)` is the whole job; each piece it calls lives in
its own module (data pipeline, sharding layout, train program, checkpoint, metrics).
"""

import dataclasses
import datetime
import json
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from lima_jax import checkpoint as ckpt, config as config_lib, model_store
from lima_jax.backend import compile_step
from lima_jax.data import pipeline
from lima_jax.errors import ConfigError, NonFiniteLoss, ResumeRefused
from lima_jax.model import flops_per_token, init_params, lora as lora_lib
from lima_jax.run_config import RunConfig
from lima_jax.sharding import BatchLayout, make_mesh, num_slices
from lima_jax.train.metrics import MetricsWriter, peak_flops_per_device
from lima_jax.train.program import TrainProgram, batch_layout_for, bucket_rows, build_program
from lima_jax.train.step import TrainState, model_params


@dataclasses.dataclass
class Run:
    """Everything fixed before the first step."""
    config: RunConfig  # the typed config the run reads
    raw: ml_collections.ConfigDict  # the same as given, written to config.json and checkpoints
    workdir: epath.Path
    data: pipeline.LimaData
    plan: pipeline.Plan
    layout: BatchLayout
    program: TrainProgram
    manager: object  # orbax CheckpointManager
    identity: dict  # config_lib.run_identity, saved in every checkpoint
    lora: model_store.LoraRecord | None  # the adapters' settings and base (its fingerprint read once), saved too
    epoch_ends: list[int]  # the step each epoch ends at
    train_iter: object  # the Grain iterator of the steps' batches (restored in place on resume)

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps


def train(raw: ml_collections.ConfigDict, workdir) -> TrainState:
    run = prepare(raw, workdir)
    config = run.config
    log_plan(run)
    state = restore_or_init(run)
    start = int(state.step)
    record_config(run, start)
    loop = StepLoop(run, start)
    try:
        with jax.set_mesh(run.program.mesh), stop_on_sigterm() as stop:
            for step in range(start, run.total_steps):
                if 0 < config.train.max_steps <= step:
                    break
                state = loop.step(state, step)
                done = step + 1
                if done in run.epoch_ends or (config.train.checkpoint_every_steps
                                              and done % config.train.checkpoint_every_steps == 0):
                    save(run, done, state, loop.train_iter)
                if done in run.epoch_ends:
                    end_of_epoch(run, done, state, loop.writer)
                if stop_requested(stop["signal"] is not None, done, config.train.log_every_steps):
                    log(f"signal {stop['signal'] or 'on another process'}: saving step {done} and exiting")
                    save(run, done, state, loop.train_iter)
                    break
    finally:
        run.manager.wait_until_finished()
        run.manager.close()
        loop.close()
    if config.train.select and int(state.step) == run.total_steps and jax.process_index() == 0:
        from lima_jax.train.selection import select_epoch  # the judge's client is optional for training

        log(f"judging epochs {config.train.selected_epochs()} with {config.train.judge_model} at {config.train.judge_url}")
        log(select_epoch(config, run.workdir)["printed"])
    return state


# ---- before the first step: everything that can fail does so here, before compiling ----

def prepare(raw: ml_collections.ConfigDict, workdir) -> Run:
    workdir = ckpt.as_path(workdir)
    config_lib.adopt_checkpoint_rope(raw)  # the converted weights' RoPE scaling, not the size file's
    config = config_lib.validate(raw, jax.device_count(), num_slices(jax.devices()))
    if not config.data.train_path and not config.data.mixture:
        raise ConfigError("config.data.train_path is empty: give the training data (a file, a folder, gs://, hf://)")
    model_cfg = config.model
    if config.train.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(epath.Path(config.train.compilation_cache_dir).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    data = pipeline.load_data(config.data, config.seed, tokenizer=model_store.training_tokenizer(config))
    if not data.tokenizer.fits_vocab(model_cfg.vocab_size):
        raise ConfigError(f"the tokenizer {config.data.tokenizer_path or '(demo)'} needs {data.tokenizer.vocab_size} "
                          f"ids{' (pieces + EOT)' if data.tokenizer.eot_added else ''}, but config.model.vocab_size="
                          f"{model_cfg.vocab_size}: use the tokenizer the weights were converted with")
    identity = config_lib.run_identity(raw, data.digest("train"), data.digest("dev"))
    check_same_run_on_all_processes(raw, identity)
    plan = pipeline.make_plan(data, config.data.examples_per_step, config.train.epochs, config.data.grouping,
                              config.data.row_buckets)
    layout = batch_layout_for(config, plan.rows_needed, jax.devices())
    plan = dataclasses.replace(plan, rows_per_step=layout.rows, buckets=bucket_rows(layout, plan.buckets))
    mesh = make_mesh(config.mesh, context=layout.context)
    program = build_program(config, mesh, plan.total_steps)

    # Steps take the epochs back to back, examples_per_step at a time, so a step can hold the end
    # of one epoch and the start of the next: an epoch "ends" at its share of the steps.
    epochs = plan.epochs
    epoch_ends = [round(plan.total_steps * e / epochs) for e in range(1, epochs + 1)]
    keep = [epoch_ends[e - 1] for e in config.train.keep_epochs if 0 < e <= epochs]
    manager = ckpt.manager(workdir / ckpt.CHECKPOINTS_SUBDIR, keep_steps=keep,
                           async_save=config.train.async_checkpointing)
    run = Run(config, raw, workdir, data, plan, layout, program, manager, identity, model_store.lora_record(config),
              epoch_ends, pipeline.train_iterator(data, plan))
    check_resume(run)
    return run


def check_same_run_on_all_processes(config, identity: dict) -> None:
    """Every process must run the same job: the same config (mesh and speed settings included:
    a process compiling another program hangs the collectives) and the same examples (each packs
    the whole batch itself). Compared before anything compiles; the message lists what differs."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = json.dumps({"config": json.loads(config.to_json_best_effort()), "run": identity}, sort_keys=True).encode()
    width = int(np.max(multihost_utils.process_allgather(np.int32(len(mine)))))
    padded = np.frombuffer(mine.ljust(width, b"\0"), np.uint8)  # allgather needs one shape everywhere
    records = [json.loads(bytes(r).rstrip(b"\0")) for r in np.asarray(multihost_utils.process_allgather(padded))]
    reference = _flat(records[0])
    differ = {p: sorted(k for k in set(reference) | set(flat) if reference.get(k) != flat.get(k))
              for p, flat in enumerate(map(_flat, records)) if flat != reference}
    if differ:
        lines = [f"  process {p}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" for p, keys in differ.items()]
        raise ConfigError("processes run different jobs; keys that differ from process 0:\n" + "\n".join(lines) +
                          "\nGive every process the same command line and the same data files (run.data.* are the "
                          "content digests of the examples read)", todo="")


def _flat(record: dict, prefix: str = "") -> dict:
    """{"a.b": value} for a nested dict."""
    out = {}
    for k, v in record.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(run: Run) -> None:
    """A resume must continue the same run: compare the run-defining values with the latest
    checkpoint's and refuse, listing the keys, unless they are accepted deliberately."""
    step = run.manager.latest_step()
    if step is None:
        return
    try:
        saved = model_store.read_meta(run.manager.directory / str(step)).run
    except Exception:  # noqa: BLE001  a damaged step: restore falls back and the next resume compares
        return
    if saved is None:
        log(f"warning: checkpoint {step} records no run identity (written by an older lima_jax): not compared")
        return
    accepted = run.config.train.accept_changed
    changed = [k for k in config_lib.changed_run_keys(saved, run.identity) if not config_lib.is_accepted(k, accepted)]
    if changed:
        value = config_lib.run_value
        lines = [f"  {k}: {value(saved, k)!r} -> {value(run.identity, k)!r}" for k in changed]
        keys = tuple(sorted({k.split(".")[0] if k.startswith(("model.", "optimizer.")) else k for k in changed}))
        raise ResumeRefused(
            f"{run.workdir} holds checkpoint {step} of a different run; changed:\n" + "\n".join(lines) +
            f"\nUse another --workdir, or accept the change deliberately: --config.train.accept_changed=\"{keys}\"")


def restore_or_init(run: Run) -> TrainState:
    """Resume from the newest good checkpoint in the work dir, else start from
    `config.init_checkpoint` (converted weights) or from a random init. Under LoRA the work dir
    holds the adapters only: the frozen base is read again at every start (`load_base`)."""
    program, config = run.program, run.config
    abstract, shardings = program.abstract_state, program.state_shardings
    base = None if program.lora is None else load_base(run)
    restored = ckpt.restore_train_state(run.manager, ckpt.target_tree(abstract.params, shardings.params),
                                        ckpt.target_tree(abstract.opt_state, shardings.opt_state), run.train_iter,
                                        warn=lambda m: log(f"warning: {m}"))
    if restored is not None:
        step, params, opt_state, _ = restored
        log(f"resuming from {run.manager.directory}/{step}")
        return TrainState(jax.device_put(jnp.int32(step), shardings.step), params, opt_state, base)
    if program.lora is not None:
        log(f"LoRA adapters: rank {program.lora.rank} on {', '.join(program.lora.targets)}, b = 0 (starts as the base)")
        params = jax.jit(lora_lib.init_adapters, static_argnums=(0, 1), out_shardings=shardings.params)(
            program.model_cfg, program.lora, jax.random.fold_in(jax.random.key(config.seed), lora_lib.INIT_STREAM))
    elif config.init_checkpoint:
        log(f"initial weights from {config.init_checkpoint}")
        params = ckpt.restore_params(config.init_checkpoint, abstract.params, shardings.params)
    else:
        log("initial weights: random (set config.init_checkpoint to fine-tune converted weights)")
        params = jax.jit(init_params, static_argnums=0, out_shardings=shardings.params)(
            program.model_cfg, jax.random.key(config.seed))
    opt_state = jax.jit(program.optimizer.init, out_shardings=shardings.opt_state)(params)
    return TrainState(jax.device_put(jnp.int32(0), shardings.step), params, opt_state, base)


def load_base(run: Run) -> dict:
    """A LoRA run's frozen base on the state's shardings (model_store.frozen_base: the weights of
    `config.init_checkpoint`, or the seed's random init, full fine-tuning's). On a resume it must
    still hold the weights the saved adapters were trained on (model_store.check_resumed_base)."""
    program, record = run.program, run.lora
    step = run.manager.latest_step()
    if step is not None:
        model_store.check_resumed_base(run.manager.directory / str(step), record)
    return model_store.frozen_base(record, program.model_cfg, program.mesh, program.state_shardings.base, say=log)


def log_plan(run: Run) -> None:
    """What the run will do, printed before anything is restored or compiled."""
    plan, layout, data, mesh = run.plan, run.layout, run.data, run.program.mesh
    log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)")
    log(f"data: {data.describe()}")
    log(f"plan: {plan.total_steps} steps over {plan.epochs} epochs, {plan.examples_per_step} examples a step "
        f"(the last step {plan.last_step_examples}), {plan.grouping} grouping; {plan.describe_rows()}: "
        f"{100 * plan.efficiency:.1f}% real tokens"
        + (f"; by source over the run: {plan.describe_sources()}" if plan.by_source else ""))
    log(f"batch: {layout.describe(plan.seq_len)}")


def record_config(run: Run, start: int) -> None:
    """The effective config, printed and appended to WORKDIR/config.json (one entry a start)."""
    if jax.process_index() == 0:
        path = run.workdir / "config.json"
        history = json.loads(path.read_text()) if path.exists() else []
        history = history if isinstance(history, list) else [{"config": history}]  # a single config before
        history.append({"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                        "start_step": start, "config": json.loads(run.raw.to_json_best_effort())})
        run.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(history, indent=2))
        log("effective config:\n" + str(run.raw))


# ---- the steps ----

class StepLoop:
    """One optimizer step at a time, with the metrics logged every `log_every_steps`."""

    def __init__(self, run: Run, start: int):
        self.run, self.train_iter = run, run.train_iter
        wandb = dict(config=json.loads(run.raw.to_json_best_effort()), project=run.config.train.wandb_project)
        self.writer = MetricsWriter(run.workdir, start, wandb=wandb if run.config.train.wandb else None)
        self.flops_per_real_token = flops_per_token(run.program.model_cfg, run.plan.seq_len, run.program.lora)
        self.peak = peak_flops_per_device(override=run.config.train.peak_flops_per_device)
        self.progress = progress_bar(start, run.total_steps)
        self.dropout_key = jax.random.key(run.config.seed + 1)  # the init key is config.seed
        self.compiled = {}  # rows -> the step compiled for that batch shape (one per row bucket)
        self.pending: list[tuple[dict, int]] = []  # (device metrics, examples) not yet logged
        self.last_time = time.perf_counter()

    def step(self, state: TrainState, step: int) -> TrainState:
        batch = next(self.train_iter)
        examples, rows = int(batch["examples"]), batch["tokens"].shape[0]
        batch = pipeline.global_batch(batch, self.run.program.mesh)
        profile(self.run.config.train.profile_steps, step, self.run.workdir)
        if rows not in self.compiled:  # the batches of a bucket share its shapes and shardings
            self.compiled[rows] = compile_step(self.run.program.train_step, state, batch, self.dropout_key)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = self.compiled[rows](state, batch, self.dropout_key)
        self.pending.append((metrics, examples))
        done = step + 1
        if (done % self.run.config.train.log_every_steps == 0 or done in self.run.epoch_ends
                or done == self.run.total_steps):
            self.log_pending(done)
        self.progress.update(1)
        return state

    def log_pending(self, done: int) -> None:
        rows = jax.device_get([m for m, _ in self.pending])  # the only host round trip: metrics
        now = time.perf_counter()
        step_time = (now - self.last_time) / len(rows)
        for offset, (row, (_, examples)) in enumerate(zip(rows, self.pending)):
            step = done - len(rows) + offset + 1
            if not np.isfinite(row["loss"]):
                self.run.manager.wait_until_finished()
                last = self.run.manager.latest_step()
                resumable = f"rerunning resumes from checkpoint {last}" if last is not None else \
                    "no checkpoint was saved yet, so a rerun starts over"
                raise NonFiniteLoss(f"loss is {row['loss']} at step {step}; stopping ({resumable} in "
                                    f"{self.run.manager.directory})")
            report = dict(row, examples=examples, step_time=step_time,
                          tokens_per_s=float(row["real_tokens"]) / step_time)
            if self.peak:
                report["mfu"] = self.flops_per_real_token * report["tokens_per_s"] / (self.peak * jax.device_count())
            self.writer.write(step, report)
        self.last_time, self.pending = now, []
        self.progress.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{rows[-1]['learning_rate']:.2e}")

    def close(self) -> None:
        self.writer.close()
        self.progress.close()


def save(run: Run, step: int, state: TrainState, train_iter) -> None:
    tokenizer = run.data.tokenizer
    meta = model_store.CheckpointMeta(
        model=run.program.model_cfg, step=step, eot_id=tokenizer.eot_id, tokenizer=tokenizer.to_record(),
        chat_format=run.config.data.chat_format, config=json.loads(run.raw.to_json_best_effort()), run=run.identity,
        source={"from": "train"}, lora=run.lora)
    ckpt.save_train_state(run.manager, step, state.params, state.opt_state, train_iter, meta.to_json())


def end_of_epoch(run: Run, step: int, state: TrainState, writer: MetricsWriter) -> None:
    """Dev loss and perplexity, and a few sampled dev answers, when there is a dev set."""
    if not run.data.dev or not run.config.train.eval_every_epoch:
        return
    epoch = run.epoch_ends.index(step) + 1
    total = count = 0.0
    for batch in pipeline.dev_batches(run.data, run.plan):
        t, c = run.program.eval_step(state.params, pipeline.global_batch(batch, run.program.mesh), state.base)
        total, count = total + float(t), count + float(c)
    loss = total / max(count, 1.0)
    writer.write(step, {"epoch": epoch, "dev_loss": loss, "dev_perplexity": float(np.exp(loss))})
    log(f"epoch {epoch}: dev loss {loss:.4f}, perplexity {np.exp(loss):.2f}")
    sample_dev_answers(run, model_params(state.params, state.base, run.program.lora), step, epoch, writer)


def sample_dev_answers(run: Run, params, step: int, epoch: int, writer: MetricsWriter) -> None:
    """Answers to the first few dev prompts (all of them for `train.select`) with LIMA's
    decoding, written next to the epoch's checkpoint so a person (or the judge) can compare
    epochs 5-10 side by side; a table in W&B too."""
    config, data = run.config, run.data
    n = len(data.dev) if config.train.select else config.train.sample_dev_prompts
    if n <= 0:
        return
    from lima_jax.sampling.decoding import SamplingSettings  # sampling is optional for training
    from lima_jax.sampling.sampler import Sampler

    sampler = Sampler(run.program.model_cfg, params, data.tokenizer, run.program.mesh, config.data.chat_format)
    prompts = pipeline.dev_prompts(data, n)
    outs = sampler.generate_ids([sampler.prompt_ids(p) for p in prompts],
                                SamplingSettings(max_new_tokens=config.train.sample_max_new_tokens), seed=config.seed)
    rows = [dict(epoch=epoch, step=step, prompt=p[-1], answer=data.tokenizer.decode(o["ids"]),
                 answer_tokens=len(o["ids"]), stopped=o["stopped"]) for p, o in zip(prompts, outs)]
    if jax.process_index() == 0:
        out = run.workdir / "dev_samples" / f"epoch{epoch:02d}_step{step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    writer.table(step, "dev_samples", rows)
    for row in rows:
        log(f"epoch {epoch} sample | {row['prompt'][:80]!r} -> {row['answer'][:160]!r}")


# ---- stopping ----

class stop_on_sigterm:
    """Records SIGTERM (preemption) instead of dying, so the loop saves and exits cleanly."""

    def __enter__(self) -> dict:
        self.flag: dict = {"signal": None}
        self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.flag.update(signal=signum))
        return self.flag

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)


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

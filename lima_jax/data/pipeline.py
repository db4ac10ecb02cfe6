"""Grain pipeline: tokenised LIMA examples -> packed, fixed-shape [rows, seq_len] batches.

Batch semantics. LIMA counts 32 (65B) or 64 (smaller) examples per optimizer step. Padding
each example to 2,048 tokens would make two thirds of the compute padding, so examples are
packed with Grain's FirstFitPackIterDataset into rows of `seq_len` tokens (segment ids keep
packed examples from attending to each other, positions restart per example). With
`rows_per_step=-1` the rows per step are chosen so that the steps per epoch stay close to
LIMA's (train examples / examples_per_step), rounded UP to `batch_multiple` (the mesh's batch
shard count) -- a large mesh therefore gives fewer, larger steps rather than padding.

Order. One stream: a per-epoch shuffle of the train examples (Grain's shuffle reshuffles each
repeat), repeated `epochs` times, packed into `packing_bins` bins at a time, batched
`rows_per_step` rows at a time; the final partial batch is filled with empty rows so shapes
never change. Packing many bins at a time is what makes >95% of tokens real; the price is that
an emission of bins can straddle an epoch boundary (each example is still seen exactly once
per epoch). The step count is computed before training by a dry run of the same packing on
lengths only (`make_plan`), so the LR schedule knows it; the dry run takes seconds.

Multi-host. Packing decides which examples share a row, so sharding the *examples* by host
would change the global batch with the process count. Every process therefore runs the same
(cheap: 1,000 examples) packing and keeps only its contiguous block of rows; `global_batch`
assembles the jax.Arrays. The result is the same global batch for any process count.

No worker processes: packing 1,000 tokenised examples in the main process takes milliseconds
per step, and workers would only add start-up time.

Trainer entry points: load_data -> make_plan (rows, total_steps for the LR schedule) ->
train_iterator (checkpoint it with grain.checkpoint) / dev_batches / dev_prompts -> global_batch.
"""

import dataclasses
import zlib

import grain
import jax
import numpy as np
from grain.experimental import FirstFitPackIterDataset
from jax.sharding import NamedSharding

from lima_jax.data.format import Stats, load_examples
from lima_jax.data.tokenizer import Tokenizer, load_tokenizer

FEATURES = ("tokens", "targets", "loss_weights")
# No prefetch threads: the data is tiny and Grain's thread prefetch costs more than it saves.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_EFFICIENCY_GUESS = 0.97  # packed real-token share used only to choose rows_per_step


def derive_seed(seed: int, name: str) -> int:
    """An independent stream per name from the one config seed."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


@dataclasses.dataclass
class LimaData:
    tokenizer: Tokenizer
    train: list[dict]  # each: ids, weights, line, turns (see format.load_examples)
    dev: list[dict]
    stats: Stats
    seed: int
    seq_len: int

    @property
    def dev_prompts(self) -> list[list[str]]:
        """Every dev conversation cut to its first user turn (see `dev_prompts()`)."""
        return [e["turns"][:1] for e in self.dev]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the loop needs to know before step 0."""
    rows_per_step: int
    seq_len: int
    epochs: int
    packing_bins: int
    total_steps: int
    steps_per_epoch: float  # total_steps / epochs (packing streams across epoch boundaries)
    real_tokens: int  # non-padding input tokens over all steps
    efficiency: float  # real_tokens / (total_steps * rows_per_step * seq_len)


def load_data(data_cfg, seed: int) -> LimaData:
    """Tokenise `data_cfg.train_path` and hold out `data_cfg.dev_size` examples chosen by the seed."""
    tokenizer = load_tokenizer(data_cfg.tokenizer_path)
    examples, stats = load_examples(data_cfg.train_path, tokenizer, data_cfg.seq_len)
    if not 0 <= data_cfg.dev_size < len(examples):
        raise ValueError(f"config.data.dev_size={data_cfg.dev_size} must be in [0, {len(examples)})")
    perm = np.random.default_rng(derive_seed(seed, "data/dev_split")).permutation(len(examples))
    dev_ids = set(perm[:data_cfg.dev_size].tolist())
    train = [e for i, e in enumerate(examples) if i not in dev_ids]
    dev = [e for i, e in enumerate(examples) if i in dev_ids]
    return LimaData(tokenizer, train, dev, stats, seed, data_cfg.seq_len)


def _features(e: dict) -> dict:
    """Next-token inputs/targets; a target's weight is its own loss weight (assistant or EOT)."""
    return dict(tokens=e["ids"][:-1], targets=e["ids"][1:], loss_weights=e["weights"][1:])


def _pack(ds: grain.MapDataset, seq_len: int, bins: int, seed: int, shuffle_bins: bool):
    return FirstFitPackIterDataset(
        ds.to_iter_dataset(_READ), length_struct={k: seq_len for k in FEATURES}, num_packing_bins=bins,
        seed=seed, shuffle_bins=shuffle_bins, meta_features=FEATURES[1:])


def _batches(packed, rows: int, process_index: int, process_count: int):
    """Rows -> fixed [rows, seq_len] batches (last one filled with empty rows) -> this process's rows."""
    if rows % process_count:
        raise ValueError(f"rows_per_step={rows} is not divisible by process_count={process_count}")
    share = rows // process_count

    def finish(row: dict) -> dict:
        out = dict(tokens=row["tokens"], targets=row["targets"], loss_weights=row["loss_weights"],
                   positions=row["tokens_positions"], segment_ids=row["tokens_segment_ids"])
        out = {k: v[process_index * share:(process_index + 1) * share] for k, v in out.items()}
        if len(out["tokens"]) < share:  # final partial batch
            out = {k: np.pad(v, ((0, share - len(v)), (0, 0))) for k, v in out.items()}
        return out

    return packed.batch(rows, drop_remainder=False).map(finish)


def _epoch_stream(train: list[dict], seed: int, epochs: int) -> grain.MapDataset:
    return grain.MapDataset.source(train).shuffle(seed=derive_seed(seed, "data/shuffle")).repeat(epochs)


def rows_per_step(data_cfg, num_train: int, train_tokens: int, batch_multiple: int = 1) -> int:
    """config value, or (rows_per_step=-1) the rows that keep LIMA's steps per epoch."""
    if data_cfg.rows_per_step > 0:
        rows = data_cfg.rows_per_step
    else:
        rows_per_epoch = train_tokens / (data_cfg.seq_len * _EFFICIENCY_GUESS)
        rows = int(np.ceil(rows_per_epoch / (num_train / data_cfg.examples_per_step)))
    return int(-(-rows // batch_multiple) * batch_multiple)


def make_plan(data: LimaData, data_cfg, epochs: int, batch_multiple: int = 1) -> Plan:
    """Rows per step and the exact step count, by a dry run of the training packing on lengths."""
    lengths = [len(e["ids"]) - 1 for e in data.train]
    rows = rows_per_step(data_cfg, len(lengths), sum(lengths), batch_multiple)
    bins = data_cfg.packing_bins
    # Same order and packing decisions as train_iterator (packing depends on lengths only).
    dummy = [dict(ids=np.zeros(n + 1, np.int8), weights=np.zeros(n + 1, np.int8)) for n in lengths]
    packed = _pack(_epoch_stream(dummy, data.seed, epochs).map(_features), data.seq_len, bins, 0, False)
    num_rows = sum(1 for _ in packed)
    steps = -(-num_rows // rows)
    real = sum(lengths) * epochs
    return Plan(rows, data.seq_len, epochs, bins, steps, steps / epochs, real, real / (steps * rows * data.seq_len))


def _process(process_index, process_count):
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def train_iterator(data: LimaData, plan: Plan, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
    """This process's rows of each training batch, `plan.total_steps` batches in all.

    A Grain DatasetIterator: save/restore it with grain.checkpoint.CheckpointSave/Restore
    (or get_state/set_state) and a resumed run sees exactly the same batches."""
    pi, pc = _process(process_index, process_count)
    ds = _epoch_stream(data.train, data.seed, plan.epochs).map(_features)
    packed = _pack(ds, plan.seq_len, plan.packing_bins, derive_seed(data.seed, "data/pack_bins"), True)
    return iter(_batches(packed, plan.rows_per_step, pi, pc))


def dev_batches(data: LimaData, plan: Plan, process_index: int | None = None,
                process_count: int | None = None) -> list[dict]:
    """The held-out dev examples packed (no shuffle) into batches shaped like training batches."""
    if not data.dev:
        return []
    pi, pc = _process(process_index, process_count)
    ds = grain.MapDataset.source(data.dev).map(_features)
    packed = _pack(ds, plan.seq_len, max(plan.packing_bins, len(data.dev)), 0, False)
    return list(_batches(packed, plan.rows_per_step, pi, pc))


def dev_prompts(data: LimaData, n: int = 4) -> list[list[str]]:
    """The first `n` dev conversations cut to their first user turn, ready for format_prompt."""
    return data.dev_prompts[:n]


def batch_sharding(mesh) -> NamedSharding:
    from lima_jax.sharding import logical_to_spec
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh.axis_names))


def global_batch(local_batch: dict, mesh) -> dict:
    """This process's rows -> global jax.Arrays sharded over the mesh's batch axes.

    Assumes processes own contiguous row blocks in process order (true for meshes built by
    lima_jax.sharding, whose device order follows the process order)."""
    sharding = batch_sharding(mesh)
    pc = jax.process_count()
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * pc,) + v.shape[1:])
            for k, v in local_batch.items()}

"""Grain pipeline: tokenised LIMA examples -> one fixed-shape [rows, seq_len] batch per step.

Batch semantics. LIMA's recipe counts examples: 32 (65B) or 64 (smaller) an optimizer step.
The shuffled epochs form one stream, cut into groups of exactly `examples_per_step` examples
(the run's last group may hold fewer); each group is one optimizer step, whatever the mesh or
the number of processes, so the step count and the learning-rate schedule depend on the data
and the recipe only. A group is packed into rows of `seq_len` tokens (first-fit decreasing;
segment ids keep packed examples from attending to each other, positions restart per
example) instead of padding each example to 2,048 tokens. Every step has the same number of
rows (static shapes): the most any group needs, or more where the mesh wants a round number
(`sharding.batch_layout`); the spare rows are padding, counted in `Plan.efficiency`.

Why not Grain's packers: they pack an endless stream and emit rows, so the examples a step
holds would vary with the rows a step has. Grain still does the shuffling (reshuffled every
epoch), the grouping and the checkpointable iterator; packing a group is a few lines here.

Multi-host. Every process builds the whole (cheap: 1,000 examples) batch and `global_batch`
hands each device its part, whichever way the rows and tokens lie over the devices.

Trainer entry points: load_data -> make_plan (steps, rows the packing needs) -> train_iterator
(checkpoint it with grain.checkpoint) / dev_batches / dev_prompts -> global_batch.
"""

import collections
import dataclasses
import hashlib
import zlib

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from lima_jax.data import chat_format
from lima_jax.data.format import Stats, load_examples
from lima_jax.data.tokenizer import Tokenizer, load_tokenizer
from lima_jax.sharding import logical_to_spec

FEATURES = ("tokens", "targets", "loss_weights", "positions", "segment_ids")
# No prefetch threads: the data is tiny and Grain's thread prefetch costs more than it saves.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def derive_seed(seed: int, name: str) -> int:
    """An independent stream per name from the one config seed."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


@dataclasses.dataclass
class LimaData:
    tokenizer: Tokenizer
    train: list[dict]  # each: ids, weights, line, turns, source (see format.load_examples)
    dev: list[dict]
    stats: Stats
    seed: int
    seq_len: int
    dev_source: str  # where the dev set came from, for the start log

    def digest(self, which: str) -> str:
        """sha256 of the `train` or `dev` examples as trained (token ids and weights, in file
        order): it changes with the file's content, the tokenizer, `sources` and `seq_len`."""
        h = hashlib.sha256()
        for e in getattr(self, which):
            h.update(np.int64(len(e["ids"])).tobytes() + e["ids"].tobytes() + e["weights"].tobytes())
        return h.hexdigest()

    def sources(self) -> dict[str, int]:
        """Train examples per `source` field."""
        return dict(collections.Counter(e["source"] or "(none)" for e in self.train))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the loop needs to know before step 0 (`rows_per_step` is set by the layout)."""
    examples_per_step: int
    rows_needed: int  # the most rows the packing of any step needs
    seq_len: int
    epochs: int
    total_steps: int
    real_tokens: int  # non-padding input tokens over all steps
    rows_per_step: int = 0

    @property
    def steps_per_epoch(self) -> float:
        return self.total_steps / self.epochs

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots of all steps' rows."""
        return self.real_tokens / (self.total_steps * max(self.rows_per_step, self.rows_needed) * self.seq_len)


def load_data(data_cfg, seed: int, tokenizer: Tokenizer | None = None) -> LimaData:
    """Tokenise `train_path` (keeping `sources`) with `tokenizer`, else `tokenizer_path`'s; the
    dev set is `dev_path`, or else `dev_size` train examples held out by the seed (0: none)."""
    tokenizer = tokenizer or load_tokenizer(data_cfg.tokenizer_path)
    sources = tuple(data_cfg.sources)
    fmt = (data_cfg.get("chat_format", "lima"), data_cfg.get("train_on", "all"))
    chat_format.check(tokenizer, fmt[0])
    examples, stats = load_examples(data_cfg.train_path, tokenizer, data_cfg.seq_len, sources, *fmt)
    if data_cfg.dev_path:
        dev, _ = load_examples(data_cfg.dev_path, tokenizer, data_cfg.seq_len, sources, *fmt)
        return LimaData(tokenizer, examples, dev, stats, seed, data_cfg.seq_len, data_cfg.dev_path)
    if not 0 <= data_cfg.dev_size < len(examples):
        raise ValueError(f"config.data.dev_size={data_cfg.dev_size} must be in [0, {len(examples)}): "
                         f"{data_cfg.train_path} has {len(examples)} trainable examples")
    perm = np.random.default_rng(derive_seed(seed, "data/dev_split")).permutation(len(examples))
    dev_ids = set(perm[:data_cfg.dev_size].tolist())
    train = [e for i, e in enumerate(examples) if i not in dev_ids]
    dev = [e for i, e in enumerate(examples) if i in dev_ids]
    where = f"{len(dev)} held out of {data_cfg.train_path}" if dev else "none"
    return LimaData(tokenizer, train, dev, stats, seed, data_cfg.seq_len, where)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths`, grouped into rows of at most `capacity`."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack_batch(examples: list[dict], rows: int, seq_len: int) -> dict:
    """One step's examples packed into [rows, seq_len] arrays (spare rows all padding), plus
    `examples`, their count. Inputs are ids[:-1], targets ids[1:], each target weighted by
    its own loss weight (assistant tokens and their EOT)."""
    packing = pack_rows([len(e["ids"]) - 1 for e in examples], seq_len)
    if len(packing) > rows:
        raise ValueError(f"a step's {len(examples)} examples need {len(packing)} rows of {seq_len} tokens, "
                         f"more than the {rows} of config.data.rows_per_step")
    out = {k: np.zeros((rows, seq_len), np.float32 if k == "loss_weights" else np.int32) for k in FEATURES}
    for r, members in enumerate(packing):
        at = 0
        for segment, i in enumerate(members, start=1):
            ids, weights = examples[i]["ids"], examples[i]["weights"]
            n = len(ids) - 1
            out["tokens"][r, at:at + n] = ids[:-1]
            out["targets"][r, at:at + n] = ids[1:]
            out["loss_weights"][r, at:at + n] = weights[1:]
            out["positions"][r, at:at + n] = np.arange(n)
            out["segment_ids"][r, at:at + n] = segment
            at += n
    out["examples"] = np.int32(len(examples))
    return out


def _step_groups(items: list, seed: int, epochs: int, examples_per_step: int) -> grain.MapDataset:
    """The shuffled epochs, one after the other, cut into groups of `examples_per_step`."""
    return (grain.MapDataset.source(items).shuffle(seed=derive_seed(seed, "data/shuffle")).repeat(epochs)
            .batch(examples_per_step, drop_remainder=False, batch_fn=list))


def make_plan(data: LimaData, examples_per_step: int, epochs: int) -> Plan:
    """Step count and the rows the packing needs, by a dry run of the grouping on lengths."""
    lengths = [len(e["ids"]) - 1 for e in data.train]
    groups = _step_groups(lengths, data.seed, epochs, examples_per_step)
    rows_needed = max(len(pack_rows(list(group), data.seq_len)) for group in groups)
    return Plan(examples_per_step, rows_needed, data.seq_len, epochs, len(groups), sum(lengths) * epochs)


def train_iterator(data: LimaData, plan: Plan) -> grain.DatasetIterator:
    """The whole batch of every step, `plan.total_steps` in all (the same on every process).

    A Grain DatasetIterator: save/restore it with grain.checkpoint.CheckpointSave/Restore
    (or get_state/set_state) and a resumed run sees exactly the same batches, on any mesh."""
    groups = _step_groups(data.train, data.seed, plan.epochs, plan.examples_per_step)
    return iter(groups.map(lambda group: pack_batch(group, plan.rows_per_step, plan.seq_len)).to_iter_dataset(_READ))


def dev_batches(data: LimaData, plan: Plan) -> list[dict]:
    """The dev examples packed (in file order) into batches shaped like training batches."""
    packing = pack_rows([len(e["ids"]) - 1 for e in data.dev], plan.seq_len)
    per_batch = plan.rows_per_step
    return [pack_batch([data.dev[i] for row in packing[at:at + per_batch] for i in row], per_batch, plan.seq_len)
            for at in range(0, len(packing), per_batch)]


def dev_prompts(data: LimaData, n: int = 4) -> list[list[str]]:
    """The first `n` dev conversations cut to their first user turn, ready for `Sampler.prompt_ids`."""
    return [e["turns"][:1] for e in data.dev[:n]]


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh.axis_names))


def global_batch(batch: dict, mesh) -> dict:
    """A whole batch (the same numpy arrays on every process) -> jax.Arrays laid over the mesh;
    each process hands over only the blocks of its own devices. `examples` is not sent."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items() if k in FEATURES}


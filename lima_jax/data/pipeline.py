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

Mixtures (`config.data.mixture`, e.g. `(("data/lima.jsonl", 3.0), ("mine.jsonl", 1.0))`, each
entry `(path, weight)` or `(path, weight, format)`): an epoch of a mixture is as long as it takes to
see the FIRST source once, `len(first) / its share` examples; every source is reshuffled each time
it is used up (so a small source repeats within an epoch, a large one spreads over several), and
Grain's `mix` interleaves the sources by weight, so every step, and the run, holds them in their
shares. All of it comes from the seed (`derive_seed(seed, "mixture")`), never from the mesh.

Trainer entry points: load_data -> make_plan (steps, rows the packing needs) -> train_iterator
(checkpoint it with grain.checkpoint) / dev_batches / dev_prompts -> global_batch.
"""

import collections
import dataclasses
import hashlib
import itertools
import zlib

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from lima_jax.data import chat_format
from lima_jax.data.format import Stats, load_examples
from lima_jax.data.readers import FORMATS
from lima_jax.data.tokenizer import Tokenizer, load_tokenizer
from lima_jax.errors import ConfigError
from lima_jax.sharding import logical_to_spec

GROUPINGS = ("random", "balanced")  # config.data.grouping: see the module docstring
FEATURES = ("tokens", "targets", "loss_weights", "positions", "segment_ids")
# No prefetch threads: the data is tiny and Grain's thread prefetch costs more than it saves.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def derive_seed(seed: int, name: str) -> int:
    """An independent stream per name from the one config seed."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Source:
    """One input of the training data: the whole train_path, or one entry of data.mixture."""
    path: str
    weight: float = 1.0
    format: str = "auto"


def data_sources(data_cfg) -> list[Source]:
    """`train_path`, or the entries of `mixture`, checked; raises ConfigError naming the key."""
    fmt = getattr(data_cfg, "format", "auto")
    if fmt not in ("auto", *FORMATS):
        raise ConfigError(f"config.data.format={fmt!r}: one of {['auto', *FORMATS]}")
    mixture = getattr(data_cfg, "mixture", ())
    if not mixture:
        return [Source(data_cfg.train_path, 1.0, fmt)]
    usage = "a tuple of (path, weight) or (path, weight, format) entries, e.g. (('lima.jsonl', 3.0), ('mine.jsonl', 1.0))"
    out = []
    for i, entry in enumerate(mixture):
        key = f"config.data.mixture[{i}]={entry!r}"
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise ConfigError(f"{key}: {usage}")
        path, weight, own = (*entry, fmt)[:3]
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key}: the path must be a non-empty string ({usage})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{key}: the weight must be a positive number")
        if own not in ("auto", *FORMATS):
            raise ConfigError(f"{key}: the format must be one of {['auto', *FORMATS]}")
        out.append(Source(path, float(weight), own))
    paths = [src.path for src in out]
    if len(set(paths)) < len(paths):
        raise ConfigError(f"config.data.mixture={mixture!r} names a path twice: give each source once, with its weight")
    if data_cfg.train_path and data_cfg.train_path not in paths:
        raise ConfigError(f"config.data.train_path={data_cfg.train_path!r} is not in config.data.mixture: the mixture is "
                          f"the training data; set --config.data.train_path='' (or list it in the mixture)")
    return out


@dataclasses.dataclass
class LimaData:
    tokenizer: Tokenizer
    train: list[dict]  # each: ids, weights, line, where, turns, system, source, origin (see format.load_examples)
    dev: list[dict]
    stats: Stats
    seed: int
    seq_len: int
    dev_source: str  # where the dev set came from, for the start log
    inputs: tuple[Source, ...] = ()  # the train sources; an example's `origin` indexes them
    formats: tuple[str, ...] = ()  # the record format each input was read as ("openai, detected")
    mixed: bool = False  # the inputs are a data.mixture (sampled by weight) rather than one train_path

    def digest(self, which: str) -> str:
        """sha256 of the `train` or `dev` examples as trained (token ids and weights, in file
        order): it changes with the files' content, the tokenizer, `sources`, `seq_len` and, for a
        mixture, the sources' weights."""
        h = hashlib.sha256()
        for e in getattr(self, which):
            h.update(np.int64(len(e["ids"])).tobytes() + e["ids"].tobytes() + e["weights"].tobytes())
        if which == "train" and self.mixed:
            h.update(repr([(e["origin"], len(e["ids"])) for e in self.train]).encode())
            h.update(repr([src.weight for src in self.inputs]).encode())
        return h.hexdigest()

    def sources(self) -> dict[str, int]:
        """Train examples per mixture source (a mixture) or per `source` field (one train_path)."""
        if self.mixed:
            return dict(collections.Counter(self.inputs[e["origin"]].path for e in self.train))
        return dict(collections.Counter(e["source"] or "(none)" for e in self.train))

    def describe(self) -> str:
        """The start log's account of the data: inputs and formats, examples by source, dev, counts."""
        read = ", ".join(f"{src.path} ({fmt}{f', weight {src.weight:g}' if self.mixed else ''})"
                         for src, fmt in zip(self.inputs, self.formats))
        by_source = ", ".join(f"{k} {v}" for k, v in sorted(self.sources().items()))
        return (f"{read}: {len(self.train)} train examples ({by_source}); dev: {self.dev_source} ({len(self.dev)}); "
                f"{self.stats}")


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
    examples: int = 0  # examples over the run (all epochs)
    by_source: tuple[tuple[str, int], ...] = ()  # a mixture's examples over the run, by source
    grouping: str = "random"  # how the epochs' examples are dealt into steps (GROUPINGS)
    step_rows: tuple[int, ...] = ()  # the rows each step's packing needs
    buckets: tuple[int, ...] = ()  # the row counts steps are compiled for, smallest first (the last: rows_per_step)

    @property
    def steps_per_epoch(self) -> float:
        return self.total_steps / self.epochs

    @property
    def last_step_examples(self) -> int:
        return self.examples - (self.total_steps - 1) * self.examples_per_step

    @property
    def shapes(self) -> tuple[int, ...]:
        """The rows of every compiled step shape, smallest first; the largest is `rows_per_step`."""
        top = max(self.rows_per_step, self.rows_needed)  # the last bucket's rows, as laid out
        return (*sorted({b for b in self.buckets[:-1] if b < top}), top)

    def rows_for(self, needed: int) -> int:
        """The rows of the smallest step shape that holds a packing of `needed` rows."""
        return min(b for b in self.shapes if b >= needed)

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots of all steps' rows."""
        slots = sum(map(self.rows_for, self.step_rows)) if self.step_rows else self.total_steps * self.shapes[-1]
        return self.real_tokens / (slots * self.seq_len)

    def describe_rows(self) -> str:
        """Steps by their rows: "11 rows x 446 steps" (one shape) or a count for each bucket."""
        counts = collections.Counter(map(self.rows_for, self.step_rows))
        return ", ".join(f"{rows} rows x {counts[rows]} steps" for rows in self.shapes)

    def describe_sources(self) -> str:
        """A mixture's examples over the run by source, with their shares ("" without a mixture)."""
        return ", ".join(f"{name} {n} ({100 * n / self.examples:.1f}%)" for name, n in self.by_source)


def load_data(data_cfg, seed: int, tokenizer: Tokenizer | None = None) -> LimaData:
    """Tokenise `train_path` or the `mixture`'s sources (keeping `sources`) with `tokenizer`, else
    `tokenizer_path`'s; the dev set is `dev_path`, or else `dev_size` examples of the (first)
    train source held out by the seed (0: none)."""
    tokenizer = tokenizer or load_tokenizer(data_cfg.tokenizer_path)
    sources, inputs = tuple(data_cfg.sources), data_sources(data_cfg)
    fmt = (getattr(data_cfg, "chat_format", "lima"), getattr(data_cfg, "train_on", "all"))
    chat_format.check(tokenizer, fmt[0])
    per_input, stats, formats = [], Stats(), []
    for origin, src in enumerate(inputs):
        examples, counts, found = load_examples(src.path, tokenizer, data_cfg.seq_len, sources, *fmt,
                                                record_format=src.format, origin=origin)
        per_input.append(examples)
        stats += counts
        formats.append(found)
    first, others = per_input[0], [e for examples in per_input[1:] for e in examples]
    found = dict(inputs=tuple(inputs), formats=tuple(formats), mixed=bool(getattr(data_cfg, "mixture", ())))
    if data_cfg.dev_path:
        dev, _, dev_format = load_examples(data_cfg.dev_path, tokenizer, data_cfg.seq_len, sources, *fmt,
                                           record_format=getattr(data_cfg, "format", "auto"))
        return LimaData(tokenizer, first + others, dev, stats, seed, data_cfg.seq_len,
                        f"{data_cfg.dev_path} ({dev_format})", **found)
    if not 0 <= data_cfg.dev_size < len(first):
        raise ConfigError(f"config.data.dev_size={data_cfg.dev_size} must be in [0, {len(first)}): "
                          f"{inputs[0].path} has {len(first)} trainable examples")
    perm = np.random.default_rng(derive_seed(seed, "data/dev_split")).permutation(len(first))
    dev_ids = set(perm[:data_cfg.dev_size].tolist())
    train = [e for i, e in enumerate(first) if i not in dev_ids] + others
    dev = [e for i, e in enumerate(first) if i in dev_ids]
    where = f"{len(dev)} held out of {inputs[0].path}" if dev else "none"
    return LimaData(tokenizer, train, dev, stats, seed, data_cfg.seq_len, where, **found)


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


def _indices(data: LimaData, epochs: int) -> grain.MapDataset:
    """The index in `data.train` of every example the run trains on, in order: one train_path's
    shuffled epochs back to back, or a mixture's sources interleaved by weight (see the module
    docstring)."""
    if not data.mixed:
        return grain.MapDataset.range(len(data.train)).shuffle(seed=derive_seed(data.seed, "data/shuffle")).repeat(epochs)
    parts = [[i for i, e in enumerate(data.train) if e["origin"] == k] for k in range(len(data.inputs))]
    weights = [src.weight for src in data.inputs]
    shares = [w / sum(weights) for w in weights]
    total = round(len(parts[0]) / shares[0]) * epochs
    seed = derive_seed(data.seed, "mixture")
    streams = [grain.MapDataset.source(part).shuffle(seed=derive_seed(seed, f"source {i}"))
               .repeat(-(-round(total * share) // len(part)) + 1)  # enough passes to cover its share of the run
               for i, (part, share) in enumerate(zip(parts, shares))]
    return grain.MapDataset.mix(streams, weights)[:total]


def _examples(data: LimaData, epochs: int) -> grain.MapDataset:
    """Every example the run trains on, in the random order (`_indices`)."""
    return _indices(data, epochs).map(lambda i: data.train[i])


def balance_groups(order: np.ndarray, lengths: np.ndarray, epochs: int, examples_per_step: int,
                   seq_len: int) -> np.ndarray:
    """`order` (indices into `lengths`, the run's epochs back to back) with examples swapped
    between the steps of the same epoch until every step's packing needs at most the rows of
    the mean step (rounded up), where swaps can get there: each epoch stays a permutation and
    most steps keep the examples the shuffle gave them (only the fullest steps trade a long
    example for a shorter one of the emptiest steps)."""
    order, k = np.array(order), examples_per_step
    per_epoch, steps = len(order) // epochs, -(-len(order) // k)
    target = -(-int(lengths[order].sum()) // (steps * seq_len))

    def tokens(g):
        return int(lengths[order[g * k:(g + 1) * k]].sum())

    def rows(g):
        return len(pack_rows(lengths[order[g * k:(g + 1) * k]].tolist(), seq_len))

    for start in range(0, len(order), per_epoch):
        stop = start + per_epoch
        groups = range(start // k, (stop - 1) // k + 1)
        need = {g: rows(g) for g in groups}
        slots = {g: np.arange(max(g * k, start), min((g + 1) * k, stop)) for g in groups}  # this epoch's places
        for _ in range(8 * len(groups)):
            heavy = max(groups, key=lambda g: (need[g], tokens(g)))
            if need[heavy] <= target or not _swap_into(order, lengths, heavy, slots, need, tokens, rows, target):
                break
    return order


def _swap_into(order, lengths, heavy, slots, need, tokens, rows, target) -> bool:
    """Swap one example of step `heavy` with a shorter one of the emptiest step that stays
    within `target` rows, taking the pair that brings the two steps' tokens closest together."""
    for light in sorted(slots, key=tokens):
        gap = (tokens(heavy) - tokens(light)) / 2
        if light == heavy or gap <= 0:
            continue
        diff = lengths[order[slots[heavy]]][:, None] - lengths[order[slots[light]]][None, :]
        cost = np.where((diff > 0) & (diff <= 2 * gap), np.abs(diff - gap), np.inf)
        if not np.isfinite(cost.min()):
            continue
        a, b = np.unravel_index(np.argmin(cost), cost.shape)
        a, b = slots[heavy][a], slots[light][b]
        order[a], order[b] = order[b], order[a]
        if rows(light) <= target:
            need[heavy], need[light] = rows(heavy), rows(light)
            return True
        order[a], order[b] = order[b], order[a]
    return False


def _run_order(data: LimaData, epochs: int, examples_per_step: int, grouping: str) -> list[int]:
    """The index in `data.train` of every example the run trains on, in order, `grouping`'d."""
    indices = _indices(data, epochs)
    order = np.array([indices[i] for i in range(len(indices))], np.int64)  # random access: no iterator threads
    if grouping == "balanced":
        lengths = np.array([len(e["ids"]) - 1 for e in data.train])
        order = balance_groups(order, lengths, epochs, examples_per_step, data.seq_len)
    return order.tolist()


def _step_groups(data: LimaData, epochs: int, examples_per_step: int, grouping: str = "random") -> grain.MapDataset:
    """The run's examples cut into groups of `examples_per_step` (the last may hold fewer)."""
    order = _run_order(data, epochs, examples_per_step, grouping)
    return (grain.MapDataset.source(order).map(lambda i: data.train[i])
            .batch(examples_per_step, drop_remainder=False, batch_fn=list))


def choose_buckets(step_rows, count: int) -> tuple[int, ...]:
    """At most `count` row counts, the largest the fullest step's, that leave the fewest rows
    over all steps when each step takes the smallest one that holds it."""
    values = sorted(set(step_rows))
    top, rest = values[-1], values[:-1]
    options = [(*c, top) for c in itertools.combinations(rest, min(count - 1, len(rest)))]
    return min(options, key=lambda b: (sum(min(r for r in b if r >= n) for n in step_rows), b))


def make_plan(data: LimaData, examples_per_step: int, epochs: int, grouping: str = "random",
              row_buckets: int = 1) -> Plan:
    """Step count and the rows each step's packing needs, by a dry run of the grouping;
    `buckets`: the `row_buckets` row counts the steps are compiled for (see `choose_buckets`)."""
    steps = _step_groups(data, epochs, examples_per_step, grouping)
    groups = [[(len(e["ids"]) - 1, e["origin"]) for e in steps[i]] for i in range(len(steps))]
    lengths = [[n for n, _ in group] for group in groups]
    step_rows = tuple(len(pack_rows(group, data.seq_len)) for group in lengths)
    by_source = collections.Counter(origin for group in groups for _, origin in group)
    return Plan(examples_per_step, max(step_rows), data.seq_len, epochs, len(lengths), sum(map(sum, lengths)),
                examples=sum(map(len, lengths)),
                by_source=tuple((src.path, by_source[i]) for i, src in enumerate(data.inputs) if data.mixed),
                grouping=grouping, step_rows=step_rows, buckets=choose_buckets(step_rows, row_buckets))


def train_iterator(data: LimaData, plan: Plan) -> grain.DatasetIterator:
    """The whole batch of every step, `plan.total_steps` in all (the same on every process);
    `by_source` counts a step's examples by data input (one count without a mixture).

    A Grain DatasetIterator: save/restore it with grain.checkpoint.CheckpointSave/Restore
    (or get_state/set_state) and a resumed run sees exactly the same batches, on any mesh."""
    def batch(group):
        counts = np.bincount([e["origin"] for e in group], minlength=len(data.inputs)).astype(np.int32)
        rows = plan.rows_for(len(pack_rows([len(e["ids"]) - 1 for e in group], plan.seq_len)))
        return dict(pack_batch(group, rows, plan.seq_len), by_source=counts)

    groups = _step_groups(data, plan.epochs, plan.examples_per_step, plan.grouping)
    return iter(groups.map(batch).to_iter_dataset(_READ))


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


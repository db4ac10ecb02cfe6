"""Conversation records -> token ids and loss weights, and the counts of what training skips.

Format (LIMA, section 2 of the paper): BOS, then every utterance followed by the EOT token.
Turns alternate user, assistant, user, ...; the loss covers assistant tokens and the EOT that
ends each assistant turn, so the model learns to stop. Examples longer than `seq_len + 1` ids
are cut to `seq_len + 1` (inputs and next-token targets are then `seq_len` long) and counted.

Reading (any record format, file, folder or dataset) is `lima_jax.data.readers`: every bad
record is a `DataError` naming its `file:line` (or `file:row N`) and field. What training then
skips is counted in `Stats`, never dropped silently:
- a final user turn with no answer (the LIMA test file is all such lines) -> dropped and
  counted in `Stats.dropped_final_turns`; a record left with no assistant turn at all is
  skipped and counted in `Stats.skipped_no_response`. If nothing trainable is left,
  `DataError` (e.g. test.jsonl passed as train_path).
- a record whose `source` is not in `config.data.sources` -> `Stats.skipped_source`.
- an example whose prompt alone fills `seq_len` (no assistant target survives trimming) ->
  skipped and counted in `Stats.skipped_no_target`.
"""

import dataclasses

import numpy as np

from lima_jax.data import readers
from lima_jax.data.readers import read_conversations  # noqa: F401 (sampling.answers reads prompts here)
from lima_jax.data.tokenizer import Tokenizer
from lima_jax.errors import DataError


@dataclasses.dataclass
class Stats:
    lines: int = 0  # records read (lines of a jsonl file, rows of a columnar one) and kept by `sources`
    examples: int = 0
    trimmed: int = 0
    dropped_final_turns: int = 0
    skipped_no_response: int = 0
    skipped_no_target: int = 0
    skipped_source: int = 0  # records whose `source` is not in config.data.sources
    tokens: int = 0  # ids kept after trimming, BOS and EOT included

    def __add__(self, other: "Stats") -> "Stats":
        return Stats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def encode_conversation(turns: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights): BOS, each turn + EOT; weight 1 on odd (assistant) turns and their EOT."""
    ids, weights = [tokenizer.bos_id], [0.0]
    for i, turn in enumerate(turns):
        piece = tokenizer.encode(turn) + [tokenizer.eot_id]
        ids += piece
        weights += [float(i % 2 == 1)] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def format_prompt(turns: list[str], tokenizer: Tokenizer) -> list[int]:
    """Ids for sampling: the conversation so far (ending with a user turn) in training format;
    the model continues with the assistant turn and ends it with EOT."""
    if len(turns) % 2 != 1:
        raise ValueError("a prompt must end with a user turn (an odd number of turns)")
    return encode_conversation(turns, tokenizer)[0].tolist()


def load_examples(path: str, tokenizer: Tokenizer, seq_len: int, sources: tuple[str, ...] = (), *,
                  record_format: str = "auto", origin: int = 0) -> tuple[list[dict], Stats, str]:
    """Tokenised training examples from `path` (see `readers`), each a dict with `ids` (int32, at
    most seq_len + 1), `weights` (float32, same length), `line`, `where`, `turns`, `system`,
    `source` and `origin` (the index of the data input it came from); plus counts and the record
    format read (`readers.read`). `sources`: keep only records whose `source` is listed (empty: all)."""
    stats = Stats()
    examples = []
    conversations, found = readers.read(path, record_format)
    for conv in conversations:
        if sources and conv.source not in sources:
            stats.skipped_source += 1
            continue
        turns = list(conv.turns)
        stats.lines += 1
        if len(turns) % 2:
            turns = turns[:-1]
            stats.dropped_final_turns += 1
            if not turns:
                stats.skipped_no_response += 1
                continue
        trained = dataclasses.replace(conv, turns=tuple(turns))  # what a chat format encodes
        ids, weights = encode_conversation(list(trained.turns), tokenizer)  # the one encode call
        if len(ids) > seq_len + 1:
            ids, weights = ids[:seq_len + 1], weights[:seq_len + 1]
            stats.trimmed += 1
        if not weights[1:].any():
            stats.skipped_no_target += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        examples.append(dict(ids=ids, weights=weights, line=conv.line, where=conv.where, turns=turns,
                             system=conv.system, source=conv.source, origin=origin))
    if not examples:
        hint = f"no record has a source in config.data.sources={list(sources)}" if sources and not stats.lines else \
            "every record lacks an assistant turn?"
        raise DataError(f"{path}: no trainable example ({hint})")
    return examples, stats, found

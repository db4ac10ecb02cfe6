"""LIMA conversations -> token ids and loss weights.

Format (LIMA, section 2 of the paper): BOS, then every utterance followed by the EOT token.
Turns alternate user, assistant, user, ...; the loss covers assistant tokens and the EOT that
ends each assistant turn, so the model learns to stop. Examples longer than `seq_len + 1` ids
are cut to `seq_len + 1` (inputs and next-token targets are then `seq_len` long) and counted.

Bad input, and what happens (every message starts with `file:line:`):
- line that is not JSON, not an object, without a `conversations` list, with an empty list,
  with a non-string turn, or with an empty / whitespace-only turn -> `DataError`. These are
  bugs in the file; training on them silently would hide them (an empty answer would teach the
  model to stop at once).
- bytes that are not UTF-8 -> `DataError` naming the line. Lines are split on `\n` only: a
  raw U+2028 inside a JSON string is valid JSON, and `str.splitlines()` would cut it.
- blank line -> ignored (trailing newlines are common).
- odd number of turns (a final user turn with no answer; the LIMA test file is all such lines)
  -> the unanswered turn is dropped and counted in `Stats.dropped_final_turns`; a line left with
  no assistant turn at all is skipped and counted in `Stats.skipped_no_response`. If nothing
  trainable is left, `DataError` (e.g. test.jsonl passed as train_path).
- an example whose prompt alone fills `seq_len` (no assistant target survives trimming) ->
  skipped and counted in `Stats.skipped_no_target`.
"""

import dataclasses
import json

import numpy as np

from lima_jax.data.tokenizer import Tokenizer
from lima_jax.errors import DataError  # defined with every expected failure; importable from here too


@dataclasses.dataclass
class Stats:
    lines: int = 0
    examples: int = 0
    trimmed: int = 0
    dropped_final_turns: int = 0
    skipped_no_response: int = 0
    skipped_no_target: int = 0
    skipped_source: int = 0  # lines whose `source` is not in config.data.sources
    tokens: int = 0  # ids kept after trimming, BOS and EOT included


@dataclasses.dataclass(frozen=True)
class Conversation:
    line: int  # 1-based line number in its file
    turns: list[str]
    source: str  # the record's `source` field ("" if absent): LIMA's origin of the example


def read_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file (local or gs://), split on newlines only."""
    from etils import epath
    raw = epath.Path(path).read_bytes()
    out = []
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append((line_no, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no}: not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})") from None
    return out


def read_conversations(path: str) -> list[Conversation]:
    """Validated conversations, one for each non-blank line of a LIMA jsonl file."""
    out = []
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "conversations" not in record:
            raise DataError(f"{where}: expected an object with a 'conversations' field")
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' must be a non-empty list of strings")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str):
                raise DataError(f"{where}: turn {i} is a {type(turn).__name__}, not a string")
            if not turn.strip():
                raise DataError(f"{where}: turn {i} is empty")
        source = record.get("source", "")
        if not isinstance(source, str):
            raise DataError(f"{where}: 'source' must be a string")
        out.append(Conversation(line_no, turns, source))
    return out


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


def load_examples(path: str, tokenizer: Tokenizer, seq_len: int, sources: tuple[str, ...] = ()
                  ) -> tuple[list[dict], Stats]:
    """Tokenised training examples from a jsonl file, each a dict with `ids` (int32, at most
    seq_len + 1), `weights` (float32, same length), `line`, `turns` and `source`; plus counts.
    `sources`: keep only lines whose `source` is listed (empty: all)."""
    stats = Stats()
    examples = []
    for conv in read_conversations(path):
        if sources and conv.source not in sources:
            stats.skipped_source += 1
            continue
        line_no, turns = conv.line, conv.turns
        stats.lines += 1
        if len(turns) % 2:
            turns = turns[:-1]
            stats.dropped_final_turns += 1
            if not turns:
                stats.skipped_no_response += 1
                continue
        ids, weights = encode_conversation(turns, tokenizer)
        if len(ids) > seq_len + 1:
            ids, weights = ids[:seq_len + 1], weights[:seq_len + 1]
            stats.trimmed += 1
        if not weights[1:].any():
            stats.skipped_no_target += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        examples.append(dict(ids=ids, weights=weights, line=line_no, turns=turns, source=conv.source))
    if not examples:
        hint = f"no line has a source in config.data.sources={list(sources)}" if sources and not stats.lines else \
            "every line lacks an assistant turn?"
        raise DataError(f"{path}: no trainable example ({hint})")
    return examples, stats

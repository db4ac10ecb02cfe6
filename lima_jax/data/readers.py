"""Input files -> `Conversation` records, whatever format the records are written in.

Record formats (`config.data.format`; `auto`, the default, detects it from the first record):
- `lima`: `{"conversations": ["user", "assistant", ...], "source": ..., "system": ...}` (LIMA's
  own files; `system` is optional, written by `convert_format` for the other formats' systems);
- `openai`: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`; other
  roles (tool, function, developer) are refused: their turns cannot be trained as chat turns;
- `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}` (`user` and
  `assistant` are taken too; an optional top-level `system`);
- `alpaca`: `{"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional),
  "history": [[instruction, output], ...] (optional, earlier exchanges)}`.

Where records come from (`config.data.train_path` / `dev_path`, local or gs://): a jsonl file (one
record a line), a `.json` file holding one array of records (as Stanford's alpaca_data.json), a
Parquet file (one record a row, the columns named as the fields above), a folder of shards (every
`*.jsonl` and `*.parquet` in it, in name order), a folder written by `datasets`' `save_to_disk`,
or `hf://NAME[:split]` (anything `datasets.load_dataset(NAME)` reads: a Hub dataset or a local
folder; the split defaults to `train`).

Every bad record raises `DataError` starting with `file:line:` (columnar files and .json arrays:
`file:row N:`, N counted from 0 as `dataset[N]` does) and naming the field at fault. Reading keeps every
well-formed record; what training skips (unanswered final turns, other sources) is counted by
`format.load_examples`.
"""

import json
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator

from lima_jax import storage
from lima_jax.data.conversation import Conversation
from lima_jax.errors import DataError

FORMATS = ("lima", "openai", "sharegpt", "alpaca")
HUB = "hf://"
_SHARDS = (".jsonl", ".parquet")
# ShareGPT's own names, and the plain role names some ShareGPT-style datasets write instead
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def read(path: str, fmt: str = "auto") -> tuple[list[Conversation], str]:
    """The conversations of `path` (file, folder of shards, saved dataset or hf://), and the
    format they were read as ("openai, detected" when `fmt` is auto)."""
    out, found = [], None if fmt == "auto" else fmt
    for where, line, record in records(path):
        found = found or detect(record, where)
        out.append(_PARSERS[found](record, where, line))
    found = found or "no records"
    return out, f"{found}, detected" if fmt == "auto" else found


def read_conversations(path: str, fmt: str = "auto") -> list[Conversation]:
    return read(path, fmt)[0]


def detect(record, where: str) -> str:
    """The record format of one record, by its fields."""
    if isinstance(record, dict):
        if "messages" in record:
            return "openai"
        turns = record.get("conversations")
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt"
        if "conversations" in record:
            return "lima"  # its reader names what is wrong with the list
        if "instruction" in record:
            return "alpaca"
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: cannot tell the record format from {fields}: expected 'conversations' (lima, "
                    f"sharegpt), 'messages' (openai) or 'instruction' + 'output' (alpaca); or name it with "
                    f"config.data.format")


# ---- where records come from ----

def records(path: str) -> Iterator[tuple[str, int, object]]:
    """(where, 1-based line or row, record) for every record of a file, folder or hf:// dataset."""
    if path.startswith(HUB):
        yield from _rows(path, _hub_rows(path[len(HUB):]))
        return
    p = storage.path(path)
    if not p.is_dir():
        yield from _file_records(path)
        return
    if (p / "state.json").exists() or (p / "dataset_dict.json").exists():
        yield from _rows(path, _saved_rows(path))
        return
    shards = sorted(f.name for f in p.iterdir() if f.name.endswith(_SHARDS))
    if not shards:
        raise DataError(f"{path}: a folder without *.jsonl or *.parquet shards, and not a datasets.save_to_disk folder")
    for name in shards:
        yield from _file_records(f"{path.rstrip('/')}/{name}")


def _file_records(path: str) -> Iterator[tuple[str, int, object]]:
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        # no Arrow threads (read_table's scanner starts some): one alive at exit can abort the process
        table = pq.ParquetFile(pa.BufferReader(storage.path(path).read_bytes())).read(use_threads=False)
        yield from _rows(path, table.to_pylist())
        return
    if path.endswith(".json"):  # one JSON array of records, as Stanford's alpaca_data.json is written
        try:
            array = json.loads(storage.path(path).read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a valid JSON file ({e}); a .json file holds one array of records") from None
        if not isinstance(array, list):
            raise DataError(f"{path}: a .json file must hold one array of records (or write one record a line, .jsonl)")
        yield from _rows(path, array)
        return
    for line_no, text in read_lines(path):
        if not text.strip():
            continue  # blank lines (a trailing newline) are no records
        where = f"{path}:{line_no}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        yield where, line_no, record


def read_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file (local or gs://), split on `\\n` only: a raw
    U+2028 inside a JSON string is valid JSON, and `str.splitlines()` would cut it."""
    out = []
    for line_no, line in enumerate(storage.path(path).read_bytes().split(b"\n"), start=1):
        try:
            out.append((line_no, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no}: not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})") from None
    return out


def _rows(name: str, rows) -> Iterator[tuple[str, int, object]]:
    for i, row in enumerate(rows):
        yield f"{name}:row {i}", i + 1, row


def _saved_rows(path: str) -> list[dict]:
    import datasets

    with storage.local_copy(path) as local:
        saved = datasets.load_from_disk(local)
        if isinstance(saved, datasets.DatasetDict):
            raise DataError(f"{path}: a saved DatasetDict with splits {sorted(saved)}: point at one split's folder, "
                            f"e.g. {path.rstrip('/')}/{next(iter(saved))}")
        return saved.to_list()


def _hub_rows(spec: str) -> list[dict]:
    """The rows of `datasets.load_dataset(NAME, split=SPLIT)`; an unreachable Hub fails at once
    (datasets would retry for half a minute) unless HF_HUB_OFFLINE=1 asks for the local cache."""
    import datasets

    name, _, split = spec.partition(":")
    where = f"{HUB}{spec}"
    todo = ("with no network, set HF_HUB_OFFLINE=1 to read the datasets cache, or save the dataset where there is "
            "one (Dataset.save_to_disk(DIR) or a Parquet file) and point the path at that")
    if not os.path.isdir(name) and not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
        raise DataError(f"{where}: the Hugging Face Hub is unreachable; {todo}")
    try:
        return datasets.load_dataset(name, split=split or "train").to_list()
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, an unknown split
        raise DataError(f"{where}: cannot load the dataset ({type(e).__name__}: {e}); {todo}") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


# ---- record formats -> Conversation ----

def _conversation(messages: list[tuple[str, object, str, str]], where: str, line: int, record: dict) -> Conversation:
    """A Conversation from (role, content, role's field, content's field) messages: an optional
    system message first, then user and assistant turns alternating, starting with a user turn."""
    system, turns = _optional_text(record, "system", where), []
    for role, content, role_field, field in messages:
        if role == "system":
            if turns or system is not None:
                raise DataError(f"{where}: {role_field}: a second system message, or one after the first turn; "
                                f"only one system message, before the first user turn, is supported")
            _check_text(content, field, where)
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"{where}: {role_field}: the conversation starts with an assistant turn; it must start "
                            f"with a user turn" if not turns else f"{where}: {role_field}: two {role} turns in a row")
        _check_text(content, field, where)
        turns.append(content)
    if not turns:
        raise DataError(f"{where}: no user turn")
    return Conversation(tuple(turns), system, _optional_text(record, "source", where) or "", where, line)


def _check_text(value, field: str, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: {field} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise DataError(f"{where}: {field} is empty")


def _optional_text(record: dict, key: str, where: str) -> str | None:
    """A record's optional string field (None, or "" as columnar files write a missing one: absent)."""
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' is a {type(value).__name__}, not a string")
    return value


def _field(record, key: str, where: str, fmt: str, kind: type = object):
    if not isinstance(record, dict):
        raise DataError(f"{where}: a {type(record).__name__}, not an object with a '{key}' field ({fmt} format)")
    if key not in record:
        raise DataError(f"{where}: no '{key}' field ({fmt} format)")
    value = record[key]
    if kind is list and (not isinstance(value, list) or not value):
        raise DataError(f"{where}: '{key}' must be a non-empty list")
    return value


def _lima(record, where: str, line: int) -> Conversation:
    turns = _field(record, "conversations", where, "lima", list)
    roles = ("user", "assistant")
    return _conversation([(roles[i % 2], t, f"conversations[{i}]", f"conversations[{i}]") for i, t in enumerate(turns)],
                         where, line, record)


def _role_messages(record, where: str, key: str, fmt: str, role_key: str, text_key: str,
                   role_of: Callable[[object], str | None], allowed: str) -> list[tuple[str, object, str, str]]:
    out = []
    for i, message in enumerate(_field(record, key, where, fmt, list)):
        field = f"{key}[{i}]"
        for k in (role_key, text_key):
            _field(message, k, f"{where}: {field}", fmt)
        role = role_of(message[role_key])
        if role is None:
            raise DataError(f"{where}: {field}.{role_key} is {message[role_key]!r}: only {allowed} messages train "
                            f"(tool and function calls cannot); remove the others from the record")
        out.append((role, message[text_key], f"{field}.{role_key}", f"{field}.{text_key}"))
    return out


def _openai(record, where: str, line: int) -> Conversation:
    messages = _role_messages(record, where, "messages", "openai", "role", "content",
                              lambda r: r if r in ("system", "user", "assistant") else None, "system, user and assistant")
    return _conversation(messages, where, line, record)


def _sharegpt(record, where: str, line: int) -> Conversation:
    messages = _role_messages(record, where, "conversations", "sharegpt", "from", "value",
                              lambda r: _SHAREGPT_ROLES.get(r) if isinstance(r, str) else None,
                              "human, gpt and system (or user, assistant)")
    return _conversation(messages, where, line, record)


def _alpaca(record, where: str, line: int) -> Conversation:
    instruction = _field(record, "instruction", where, "alpaca")
    output = _field(record, "output", where, "alpaca")
    _check_text(instruction, "instruction", where)
    # The input, when given, follows the instruction on a new line, as LLaMA-Factory's Alpaca
    # converter joins them ("\n".join); Stanford's "### Input:" template is a prompt format, not data.
    extra = _optional_text(record, "input", where)
    prompt = instruction if extra is None else f"{instruction}\n{extra}"
    history = record.get("history") or []  # earlier [instruction, output] exchanges (LLaMA-Factory's multi-turn Alpaca)
    if not isinstance(history, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in history):
        raise DataError(f"{where}: 'history' must be a list of [instruction, output] pairs")
    earlier = [(role, text, f"history[{i}][{j}]", f"history[{i}][{j}]")
               for i, pair in enumerate(history) for j, (role, text) in enumerate(zip(("user", "assistant"), pair))]
    return _conversation(earlier + [("user", prompt, "instruction", "instruction"),
                                    ("assistant", output, "output", "output")], where, line, record)


_PARSERS = {"lima": _lima, "openai": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca}

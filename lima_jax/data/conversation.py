"""The one record every data reader yields and every chat format encodes.

A reader (LIMA jsonl, OpenAI messages, ShareGPT, Alpaca, columnar files) turns each input record
into a `Conversation`; the chat formats (`lima_jax.data.chat_format`) turn a Conversation into
token ids and loss weights. Nothing after the readers knows which file format a record came from.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Conversation:
    turns: tuple[str, ...]  # user, assistant, user, ...: always starts with a user turn
    system: str | None = None  # a system message, for formats that have a system role
    source: str = ""  # LIMA's `source` field, or the mixture source's name ("" if none)
    where: str = ""  # "file:line" (or "file:row N" in a columnar file), for messages and answers files
    line: int = 0  # 1-based line (row) number in its file

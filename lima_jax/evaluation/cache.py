"""The judge's replies on disk, one JSON line each, keyed by what determines a reply (the model,
the messages and the request parameters; not the URL): an interrupted run resumes with the
replies it already has, and a repeated run sends nothing. A line is appended and flushed as
soon as its reply arrives; a line torn by a kill is cut off when the cache is next opened."""

import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence

from lima_jax import storage


def cache_key(model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, object]) -> str:
    """A stable digest of the request: the same model, messages and parameters give the same key."""
    blob = json.dumps({"model": model, "messages": list(messages), "params": dict(params)}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """key -> reply (a JSON-able dict), backed by an append-only jsonl file on local disk."""

    def __init__(self, path: str):
        if "://" in str(path):
            raise ValueError(f"{path}: the judge cache must be a local file (it is appended to); pass --cache")
        self.path = storage.path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # replies arrive from several threads
        self._replies = self._load()

    def _load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # killed mid-write: drop the torn line before appending again
            os.truncate(self.path, len(complete))
        replies = {}
        for number, line in enumerate(complete.decode("utf-8").split("\n")[:-1], start=1):
            try:
                entry = json.loads(line)
                replies[entry["key"]] = entry["reply"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{self.path}:{number}: not a judge cache entry; delete the file to start over "
                                 f"or pass another --cache") from None
        return replies

    def get(self, key: str) -> dict | None:
        return self._replies.get(key)

    def put(self, key: str, reply: dict, request: Mapping[str, object] | None = None) -> None:
        """Store and persist at once (a kill right after loses nothing)."""
        line = json.dumps({"key": key, "reply": reply, "request": request}, ensure_ascii=False) + "\n"
        with self._lock:
            self._replies[key] = reply
            with self.path.open("a") as f:
                f.write(line)
                f.flush()

    def __len__(self) -> int:
        return len(self._replies)

    def __contains__(self, key: str) -> bool:
        return key in self._replies

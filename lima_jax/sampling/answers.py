"""The answers file of `sample.py --prompts`: one JSON line per prompt, in the prompts file's
order, written batch by batch so that an interrupted run keeps every finished batch and a
rerun with `resume` continues after them.

A local file is appended to and flushed after each batch (a kill loses at most the batch in
flight; a line torn mid-write is dropped on resume). A bucket object cannot be appended to, so
it is rewritten whole after each batch (GCS replaces objects atomically: never torn).
"""

import json
import os
from collections.abc import Sequence

from etils import epath

from lima_jax import storage


def check_output(path: str, overwrite: bool = False, resume: bool = False, prompts_path: str | None = None
                 ) -> epath.Path:
    """Fail before any model is loaded if answers cannot go to `path`: its folder is created
    if missing and must be writable; an existing file is refused unless `overwrite` (start
    over) or `resume` (continue it; with `prompts_path`, its answers must be that file's first
    prompts)."""
    if overwrite and resume:
        raise ValueError("pass either --overwrite (start over) or --resume (continue), not both")
    out = storage.path(path)
    if out.is_dir():
        raise IsADirectoryError(f"{path} is a folder; --output takes a file name")
    if out.exists() and not (overwrite or resume):
        raise FileExistsError(f"{path} exists: pass --resume to continue it, --overwrite to replace it, "
                              f"or choose another --output")
    if not storage.is_remote(out):  # a bucket has no folders to create (and mkdir there would create a bucket)
        out.parent.mkdir(parents=True, exist_ok=True)
    probe = out.parent / f".{out.name}.write-test-{os.getpid()}"  # a real write, the only sure test
    probe.write_text("")
    probe.unlink()
    if resume and prompts_path is not None and out.exists():
        lines, _ = _complete_lines(out)
        check_resumed([json.loads(line) for line in lines], read_prompts(prompts_path), None, path, prompts_path)
    return out


def read_prompts(prompts_path: str) -> list[tuple[int, list[str]]]:
    """(line number, turns) of each prompt of a LIMA-format jsonl file."""
    from lima_jax.data.format import read_conversations

    return [(c.line, c.turns) for c in read_conversations(prompts_path)]


class AnswersFile:
    """The rows already answered (`done`, from a resumed file) and `append` for new ones."""

    def __init__(self, path: str, overwrite: bool = False, resume: bool = False):
        self.path = check_output(path, overwrite, resume)
        self.local = not storage.is_remote(self.path)
        self.lines: list[str] = []
        if resume and self.path.exists():
            self.lines, complete = _complete_lines(self.path)
            if complete < self.path.stat().length:  # a torn last line: cut it off before appending
                if self.local:
                    os.truncate(self.path, complete)  # in place: a kill now loses nothing more
                else:
                    self.path.write_text("".join(line + "\n" for line in self.lines))
        else:
            self.path.write_text("")
        self.done = [json.loads(line) for line in self.lines]

    def append(self, rows: Sequence[dict]) -> None:
        new = [json.dumps(row, ensure_ascii=False) for row in rows]
        self.lines += new
        if self.local:
            with self.path.open("a") as f:
                f.write("".join(line + "\n" for line in new))
                f.flush()
                os.fsync(f.fileno())
        else:
            self.path.write_text("".join(line + "\n" for line in self.lines))


def _complete_lines(path: epath.Path) -> tuple[list[str], int]:
    """An answers file's complete lines and their length in bytes; a torn last line (no newline:
    killed mid-write) is left out. A broken line before the end is an error."""
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8").split("\n")[:-1]
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a complete answer ({e.msg}); pass --overwrite to start over"
                             ) from None
    return lines, len(complete)


def check_resumed(done: Sequence[dict], records: Sequence[tuple[int, list[str]]], settings: dict | None,
                  answers_path: str, prompts_path: str) -> None:
    """The rows of a resumed answers file must be the first prompts of the prompts file, answered
    with the same `settings` (None: not checked); otherwise resuming would mix two runs in one file."""
    if len(done) > len(records):
        raise ValueError(f"{answers_path} has {len(done)} answers but {prompts_path} only {len(records)} prompts: "
                         f"it answers another file; pass --overwrite or choose another --output")
    for number, (row, (line, turns)) in enumerate(zip(done, records), start=1):
        if row.get("line") != line or row.get("conversations") != list(turns):
            raise ValueError(f"{answers_path}:{number} answers another prompt than {prompts_path}:{line}; "
                             f"pass --overwrite or choose another --output")
        if settings is not None and row.get("settings") != settings:
            raise ValueError(f"{answers_path}:{number} was answered with other settings ({row.get('settings')}) "
                             f"than now ({settings}); resume with the same flags, or pass --overwrite")

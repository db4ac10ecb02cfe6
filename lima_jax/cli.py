"""Command-line errors: an expected failure (bad data, bad config, a missing or existing file,
a full disk, an unreachable bucket, a refused resume) ends a launch script with one short
message (what, where, what to do) and exit status 2; anything else keeps its traceback.
`LIMA_JAX_TRACEBACK=1` shows the traceback of every failure.

    if __name__ == "__main__":
        cli.run(main)   # absl's app.run(main), expected failures reported briefly

Expected failures are `lima_jax.errors.LimaError`s, recognised by class and reported with their
`kind` and `todo`; errors.py imports nothing, so neither does this module (no JAX). OS and
storage-client errors (a missing file, a full disk, an unreachable bucket) are recognised here.
"""

import dataclasses
import errno
import logging
import os
import re
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

from lima_jax.errors import LimaError

EXIT_EXPECTED = 2
TRACEBACK_ENV = "LIMA_JAX_TRACEBACK"
MAX_DETAIL_LINES, MAX_LINE_CHARS = 4, 400  # a long tensorstore/XLA message is cut, not printed whole

# Flags whose value is where a script writes: the "where" of a full disk when the error names no path.
OUTPUT_FLAGS = ("workdir", "output", "json")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OWN_DIRS = tuple(os.path.join(os.path.dirname(_PACKAGE_DIR), d) + os.sep for d in ("lima_jax", "launch", "configs"))
_STORAGE_CLIENTS = ("aiohttp", "gcsfs", "google", "requests", "urllib3")  # the libraries gs:// paths go through
_NETWORK_ERRORS = {"ConnectionError", "ClientConnectionError", "GoogleAuthError", "HttpError", "TimeoutError",
                   "gaierror"}
_GS_BUCKET = re.compile(r"gs://([a-z0-9][-a-z0-9_.]*)")
_QUOTED_PATH = re.compile(r"""["'](gs://[^"']+|/[^"']+)["']""")


@dataclasses.dataclass(frozen=True)
class Failure:
    """An expected failure, as the user reads it."""

    what: str  # the kind: "bad data", "disk full", ...
    detail: str  # the exception's own message (it names the file)
    todo: str = ""  # what to do about it

    def message(self) -> str:
        lines = [f"error: {self.what}: {self.detail}"]
        if self.todo:
            lines.append(f"  {self.todo}")
        lines.append(f"  ({TRACEBACK_ENV}=1 shows the traceback)")
        return "\n".join(lines)


def run(main: Callable[[list[str]], object]) -> None:
    """absl's `app.run(main)`, with expected failures reported as one short message."""
    from absl import app

    app.run(lambda argv: guarded(main, argv))


def guarded(main: Callable[[list[str]], object], argv: list[str]) -> object:
    """`main(argv)`; an expected failure prints its message and exits with EXIT_EXPECTED."""
    if not traceback_requested():
        for handler in logging.getLogger().handlers:  # absl's, once app.run has started
            handler.addFilter(_drop_expected_tracebacks)
        sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)
    try:
        return main(argv)
    except Exception as e:  # classified below; anything unrecognised is re-raised
        failure = describe(e, sys.argv)
        if failure is None or traceback_requested():
            raise
        sys.stdout.flush()  # progress printed before the failure comes first
        print("\n" + failure.message(), file=sys.stderr)  # own line, even after a progress bar
        sys.exit(EXIT_EXPECTED)


def _drop_expected_tracebacks(record: logging.LogRecord) -> bool:
    """Background threads (Orbax's saves) log the failure the main thread then raises, each with
    its traceback: those records are dropped, the final message says it once."""
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or describe(exc) is None


def _without_closed_loop_callbacks(hook):
    """`hook` (sys.unraisablehook) minus one benign report: when a save fails, Orbax's event loop
    closes while some tensorstore writes are still running; their completion callbacks then find
    the loop closed, and tensorstore reports each RuntimeError as unraisable (dozens of tracebacks
    around the one message)."""
    def unraisablehook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
                and frames and frames[0].name == "call_soon_threadsafe"):  # raised straight from a native callback
            return
        hook(unraisable)

    return unraisablehook


def traceback_requested() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def describe(exc: BaseException, argv: Sequence[str] = ()) -> Failure | None:
    """The short report of an expected failure; None for anything else (a bug keeps its traceback).

    The exception itself is judged by its type; the exceptions it was raised from are searched
    for a full disk or an unreachable bucket only, the failures a wrapper (Orbax's threads,
    tensorstore) hides, so a bug raised while handling a missing file still shows its traceback."""
    for e in _chain(exc):
        failure = _disk_full(e, argv) or _unreachable(e, argv)
        if failure:
            return failure
    return _by_type(exc)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _by_type(e: BaseException) -> Failure | None:
    detail = _clip(str(e))
    if isinstance(e, LimaError):
        return Failure(e.kind, _clip(str(e), keep_last=True), e.todo)
    if isinstance(e, FileNotFoundError):
        return Failure("missing file", _with_filename(e, detail), "check the path")
    if isinstance(e, FileExistsError):
        todo = "" if "--" in detail else "choose another output, or pass --overwrite to replace it"
        return Failure("output exists", _with_filename(e, detail), todo)
    if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError)):
        return Failure("cannot use path", _with_filename(e, detail), "check the path and its permissions")
    if isinstance(e, ValueError) and _raised_by_lima_jax(e):
        return Failure("bad config or input", detail)
    return None


def _disk_full(e: BaseException, argv: Sequence[str]) -> Failure | None:
    text = str(e)
    enospc = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    allocation = "allocat" in text.lower() or "out of memory" in text.lower()  # device memory, not a disk
    if not (enospc or "No space left on device" in text or ("RESOURCE_EXHAUSTED" in text and not allocation)):
        return None
    where = getattr(e, "filename", None) or _path_in(text) or _flag_value(argv, OUTPUT_FLAGS)
    place = f"{where}{_free_space(where)}" if where else "the output location"
    return Failure("disk full", f"no space left writing {place}: {_first_line(text)}",
                   "free space there (or write elsewhere) and rerun; training resumes from its last complete checkpoint")


def _unreachable(e: BaseException, argv: Sequence[str]) -> Failure | None:
    names, text = _names(e), str(e)
    from_client = type(e).__module__.split(".")[0] in _STORAGE_CLIENTS  # not jax.distributed's coordinator
    network = bool(names & _NETWORK_ERRORS) and (from_client or "gs://" in text)
    forbidden = isinstance(e, OSError) and text.startswith("Forbidden:")  # gcsfs's HTTP 403
    tensorstore = any(code in text for code in ("UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED")) \
        and "gs://" in text
    if not (network or forbidden or tensorstore):
        return None
    bucket = _bucket_in(text) or _bucket_in(" ".join(argv))
    where = f"bucket gs://{bucket}" if bucket else "the storage server"
    return Failure("cannot reach storage", f"{where}: {type(e).__name__}: {_first_line(text)}",
                   "check the bucket name, the network and the credentials (gcloud auth application-default login; "
                   "STORAGE_EMULATOR_HOST for a local server)")


def _raised_by_lima_jax(e: BaseException) -> bool:
    """Was `e` raised by this project's own code (a deliberate check), not deep inside a library?"""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OWN_DIRS)


def _with_filename(e: OSError, detail: str) -> str:
    name = e.filename
    return detail if not name or str(name) in detail else f"{name}: {detail}"


def _path_in(text: str) -> str | None:
    m = _QUOTED_PATH.search(text)
    return m.group(1) if m else None


def _bucket_in(text: str) -> str | None:
    m = _GS_BUCKET.search(text)
    return m.group(1) if m else None


def _flag_value(argv: Sequence[str], names: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg.startswith(f"--{name}="):
                return arg.split("=", 1)[1]
            if arg == f"--{name}" and i + 1 < len(argv):
                return argv[i + 1]
    return None


def _free_space(path: str) -> str:
    """' (N bytes free)' for a local path's disk; empty for a bucket or when unknown."""
    if "://" in str(path):
        return ""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({_human(free)} free on its disk)"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TiB"


def _first_line(text: str) -> str:
    return _clip(text.strip().split("\n", 1)[0])


def _clip(text: str, keep_last: bool = False) -> str:
    """At most MAX_DETAIL_LINES lines of MAX_LINE_CHARS; `keep_last`: the last line (a refusal's fix)
    is kept however many are cut."""
    lines = [line[:MAX_LINE_CHARS] + ("..." if len(line) > MAX_LINE_CHARS else "") for line in text.strip().split("\n")]
    if len(lines) <= MAX_DETAIL_LINES:
        return "\n".join(lines)
    if keep_last:
        return "\n".join(lines[:MAX_DETAIL_LINES - 1] + ["...", lines[-1]])
    return "\n".join(lines[:MAX_DETAIL_LINES] + ["..."])

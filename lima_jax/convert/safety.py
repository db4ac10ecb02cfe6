"""Where a converter may write: never over or inside its input, never into a folder it did not make.

Both directions write to a temporary sibling (`<output>.tmp-convert` / `.tmp-export`) and
rename it when complete. An existing temporary folder is someone else's (an interrupted run,
another conversion at work): it is refused with a message, never removed.
"""

import contextlib
import os
from collections.abc import Iterator

from etils import epath

from lima_jax import storage
from lima_jax.convert.errors import ConversionError


def _normal(path) -> str:
    """A comparable form: local paths resolved (symlinks, `..`), URLs without a trailing slash."""
    path = str(path)
    return path.rstrip("/") if "://" in path else os.path.realpath(path)


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_output_location(input_path, output, *, overwrite: bool) -> None:
    """Refuse an output equal to or inside the input, and with `overwrite` (which replaces the
    output) an input inside the output."""
    src, out = _normal(input_path), _normal(output)
    if _inside(out, src):
        raise ConversionError(f"--output={output} is {'the input' if out == src else 'inside the input'} "
                              f"--input={input_path}; choose an output outside the input")
    if overwrite and _inside(src, out):
        raise ConversionError(f"--input={input_path} is inside --output={output}: --overwrite would delete the "
                              "input; choose another output")


def refuse_existing(tmp, what: str) -> None:
    """A temporary folder that already exists belongs to another run: say so instead of removing it."""
    if tmp.exists():
        raise ConversionError(f"{tmp} already exists (left by an interrupted {what}, or one still running); "
                              f"remove it yourself once no {what} is using it, then rerun")


def export_target(input_path, output, *, overwrite: bool) -> tuple[epath.Path, epath.Path]:
    """(output, its `.tmp-export` sibling) for an export, once every refusal has passed."""
    check_output_location(input_path, output, overwrite=overwrite)
    out = storage.path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    tmp = out.parent / f"{out.name}.tmp-export"
    refuse_existing(tmp, "export")
    return out, tmp


@contextlib.contextmanager
def writing_into(tmp: epath.Path, out: epath.Path) -> Iterator[epath.Path]:
    """Yield `tmp` (created here) to write into; when done it replaces `out`, on failure it is removed."""
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    if out.exists():
        out.rmtree()
    tmp.rename(out)

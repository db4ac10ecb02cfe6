"""Where every path goes: local or `gs://`, files through etils.epath (gcsfs), arrays through
tensorstore (Orbax).

A local GCS server is named the way Google's own clients expect it, `STORAGE_EMULATOR_HOST`
(gcsfs and google-cloud-storage read it). Importing this module makes the rest follow it:
tensorstore reads its own variable, and gcsfs must not probe the bucket type over gRPC, a
probe that waits 60 s against a server that speaks only HTTP. Real buckets are left as they
are. Readers that need real files (torch.load's mmap, safetensors) take `local_copy`.
"""

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

from etils import epath

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def path(p) -> epath.Path:
    """An epath for a local or gs:// path; local ones made absolute, as Orbax requires."""
    p = epath.Path(p)
    return p if is_remote(p) else epath.Path(os.path.abspath(p))


def is_remote(p) -> bool:
    """True for a URL-like path (gs://...), False for a local file name."""
    return "://" in str(p)


@contextlib.contextmanager
def local_copy(p) -> Iterator[str]:
    """`p` as a local file or folder, for readers that need real files (torch.load's mmap,
    safetensors): `p` itself when local, else a download into a temporary folder (under
    TMPDIR), removed on exit."""
    if not is_remote(p):
        yield os.path.abspath(p)
        return
    import fsspec  # epath's walk and rglob do not give bucket paths back whole

    fs, root = fsspec.core.url_to_fs(str(p))
    with tempfile.TemporaryDirectory(prefix="lima_jax-") as tmp:
        target = os.path.join(tmp, os.path.basename(root.rstrip("/")))
        if fs.isfile(root):
            _download(fs, root, target)
        else:
            for f in fs.find(root):
                _download(fs, f, os.path.join(target, f[len(root):].lstrip("/")))
        yield target


def _download(fs, source: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with fs.open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 64 << 20)  # streamed: checkpoint shards are larger than memory


def emulator_url() -> str | None:
    """The local GCS server's URL from STORAGE_EMULATOR_HOST (scheme added as gcsfs does), or None."""
    host = os.environ.get(EMULATOR_ENV, "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def configure() -> None:
    """Point tensorstore and gcsfs at the local GCS server, if one is named. Idempotent; an
    explicit setting of either variable is kept."""
    url = emulator_url()
    if url is None:
        return
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    # gcsfs picks its filesystem class when imported: this variable selects the plain HTTP one.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if "gcsfs" in sys.modules and os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false":
        import fsspec  # gcsfs was imported before us: register the plain class in its place
        import gcsfs.core

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


configure()

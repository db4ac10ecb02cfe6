"""Where every path goes: local or `gs://`, files through etils.epath (gcsfs), arrays through
tensorstore (Orbax).

A local GCS server is named the way Google's own clients expect it, `STORAGE_EMULATOR_HOST`
(gcsfs and google-cloud-storage read it). Importing this module makes the rest follow it:
tensorstore reads its own variable, and gcsfs must not probe the bucket type over gRPC, a
probe that waits 60 s against a server that speaks only HTTP. Real buckets are left as they
are.
"""

import os
import sys

from etils import epath

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def path(p) -> epath.Path:
    """An epath for a local or gs:// path; local ones made absolute, as Orbax requires."""
    p = epath.Path(p)
    return p if is_remote(p) else epath.Path(os.path.abspath(p))


def is_remote(p) -> bool:
    """True for a URL-like path (gs://...), False for a local file name."""
    return "://" in str(p)


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

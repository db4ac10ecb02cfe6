"""Serve a checkpoint: load it onto the training mesh, start the engine, run the HTTP app.

Several processes (a TPU pod, or `--coordinator_address` hosts): every process loads its
shards and runs the engine loop; process 0 also serves HTTP and broadcasts each iteration's
new requests and cancellations to the others (feed.BroadcastFeed), so all of them run the
same jitted steps on the same slots. Stopping process 0 stops the others.
"""

import logging
import pathlib

import jax

from lima_jax.sampling.decode import DEFAULT_SLOTS
from lima_jax.serving.engine import Engine
from lima_jax.serving.feed import BroadcastFeed, LocalFeed

log = logging.getLogger(__name__)


def model_name_from_path(checkpoint_path: str) -> str:
    """A readable id: `run-1500` for WORKDIR/run/checkpoints/1500, else the folder's name."""
    parts = pathlib.PurePosixPath(str(checkpoint_path).rstrip("/")).parts
    if len(parts) >= 3 and parts[-1].isdigit() and parts[-2] == "checkpoints":
        return f"{parts[-3]}-{parts[-1]}"
    if parts and parts[-1] == "checkpoints" and len(parts) >= 2:
        return parts[-2]
    return parts[-1] if parts else "lima"


def build_engine(checkpoint_path: str, config=None, tokenizer_path: str | None = None, slots: int = DEFAULT_SLOTS,
                 mesh_overrides: dict | None = None, prefix_cache_mib: int = 0) -> Engine:
    """The checkpoint on its mesh, behind an engine of `slots` slots (not started) with a prefix
    cache of `prefix_cache_mib` MiB of device memory (0: none)."""
    from lima_jax.sampling.sampler import load_sampler

    sampler, _ = load_sampler(checkpoint_path, config, tokenizer_path, mesh_overrides)
    feed = BroadcastFeed() if jax.process_count() > 1 else LocalFeed()
    return Engine(sampler, slots, feed, prefix_cache_mib << 20)


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_body_bytes: int | None = None) -> None:
    """Block: process 0 serves HTTP until interrupted, the others run the engine loop. `api_key`:
    required as a bearer token on every route but /health (None: none)."""
    if jax.process_index() != 0:
        engine.run()
        return
    import uvicorn

    from lima_jax.serving.app import MAX_BODY_BYTES, create_app

    engine.start()
    engine.warmup()  # the first client does not wait for compilation
    try:
        log.warning("serving %s on http://%s:%d/v1 (%d slots%s)", model_name, host, port, engine.num_slots,
                    ", API key required" if api_key else "")
        app = create_app(engine, model_name, api_key, max_body_bytes or MAX_BODY_BYTES)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.shutdown()

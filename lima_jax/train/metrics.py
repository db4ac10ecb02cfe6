"""Metrics: TensorBoard, WORKDIR/metrics.jsonl (appended across restarts), W&B when on, and MFU.

A run resumed from the checkpoint of step N first drops what an interrupted run logged after
step N (it will log those steps again): rows of metrics.jsonl past N, and TensorBoard events
past N through the writer's `purge_step`. So every step appears once, as the run that
produced the final weights computed it.

MFU = model FLOPs per step / step time / (peak FLOP/s per device x devices), with model
FLOPs from `lima_jax.model.flops_per_token` (6N + attention) on the real (non-padding)
tokens of the step. Peaks are the published dense bf16 figures per chip kind.

A work dir in a bucket: GCS objects cannot be appended to, so metrics.jsonl is rewritten whole
at each row (a few hundred rows a run); TensorBoard events go through tensorboardX's own gs://
writer (google-cloud-storage), which uploads the whole events file at each flush.
"""

import json

import jax

from lima_jax import storage

# jax `device_kind` prefix -> peak dense bf16 FLOP/s of one JAX device (v4/v5p: a megacore
# chip, one device; v5e/v6e: one chip).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device=None, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override if > 0, else the table; None when unknown (CPU)."""
    if override > 0:
        return override
    kind = (device or jax.devices()[0]).device_kind
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


class MetricsWriter:
    """One writer for both sinks; only process 0 writes."""

    def __init__(self, workdir, start_step: int = 0, wandb: dict | None = None):
        """`start_step`: the step the run starts from (the restored checkpoint's, or 0); `wandb`:
        train.tracking.WandbRun's arguments (config, project) to log the rows there too."""
        self.active = jax.process_index() == 0
        self.path = storage.path(workdir) / "metrics.jsonl"
        self._tb = self._wandb = None
        self._remote_text = None  # a bucket's metrics.jsonl as written so far; None for a local file
        if self.active:
            from tensorboardX import SummaryWriter  # lazy: a heavy import, and only process 0 needs it

            self._drop_rows_after(start_step)
            if storage.is_remote(self.path):
                self._remote_text = self.path.read_text() if self.path.exists() else ""
            self._tb = SummaryWriter(str(storage.path(workdir) / "tensorboard"), purge_step=start_step + 1)
            if wandb is not None:
                from lima_jax.train.tracking import WandbRun

                self._wandb = WandbRun(workdir, **wandb)

    def _drop_rows_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _row_step(line) <= step]
        if len(kept) < len(lines):  # written whole beside it, then swapped in: no half file
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._append(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step":
                self._tb.add_scalar(key, value, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in row.items() if k != "step"})

    def table(self, step: int, key: str, rows: list[dict]) -> None:
        """Rows of text (dev answers) at `step`: to W&B when it is on (metrics.jsonl holds numbers)."""
        if self.active and self._wandb is not None:
            self._wandb.table(step, key, rows)

    def _append(self, line: str) -> None:
        if self._remote_text is None:
            with self.path.open("a") as f:
                f.write(line)
        else:  # an object is replaced whole, never appended to (gcsfs would silently overwrite)
            self._remote_text += line
            self.path.write_text(self._remote_text)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def _row_step(line: str) -> float:
    """A row's step; infinite for a line cut short by a kill mid-write, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except ValueError:
        return float("inf")

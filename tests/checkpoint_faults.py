"""Damage done to a saved checkpoint, as a bad disk, a bad copy or a bad step would: one flipped
bit in an array's stored values (the files stay valid, so only the fingerprints can tell), or a
NaN saved with a matching fingerprint (only the finite check can tell)."""

import json
import pathlib

import numpy as np
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from lima_jax import fingerprints as fp


def stored_arrays(item_dir: pathlib.Path) -> list[str]:
    """The names Orbax stored an item's arrays under ('layers.attn.wq', '0.mu.embed', ...)."""
    tree = json.loads((item_dir / "_METADATA").read_text())["tree_metadata"]
    return sorted(".".join(str(k["key"]) for k in entry["key_metadata"]) for entry in tree.values())


def open_array(item_dir: pathlib.Path, name: str):
    info = json.loads((item_dir / "_METADATA").read_text())
    spec = ts_utils.ArrayReadSpec(str(item_dir), name, bool(info.get("use_zarr3", False)),
                                  use_ocdbt=bool(info.get("use_ocdbt", True)))
    context = ts_utils.get_ts_context(use_ocdbt=bool(info.get("use_ocdbt", True)))
    return ts.open(ts.Spec(spec.json), open=True, read=True, write=True, context=context).result()


def flip_bit(item_dir: pathlib.Path, name: str, flat_index: int = 0, bit: int = 3) -> None:
    """Flip one bit of one stored element (written back through tensorstore: a valid file)."""
    array = open_array(item_dir, name)
    values = np.asarray(array.read().result())
    bits = values.reshape(-1).view(f"uint{8 * values.dtype.itemsize}")
    bits[flat_index] ^= 1 << bit
    array.write(values).result()


def save_nan(item_dir: pathlib.Path, name: str) -> None:
    """Store a NaN in a float array and record the fingerprint of the new values, as if the NaN
    had been there when the step was saved."""
    array = open_array(item_dir, name)
    values = np.asarray(array.read().result()).copy()
    values.reshape(-1)[0] = np.nan
    array.write(values).result()
    record_path = item_dir.parent / "fingerprints" / "metadata"
    record = json.loads(record_path.read_text())
    leaf = name.replace(".", "/")
    fingerprint = fp.HostFingerprint()
    fingerprint.add(values)
    dtype = record[item_dir.name][leaf].split(":")[0]
    record[item_dir.name][leaf] = f"{dtype}:{fingerprint.hex()}"
    record_path.write_text(json.dumps(record))

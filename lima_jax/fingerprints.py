"""Fingerprints of saved arrays: a checksum of each array's bits that any single flipped bit changes.

A fingerprint is one 32-bit sum over an array's elements viewed as unsigned integers of their
own width: sum(bits[i] * (2i + 1)) mod 2^32 over the flat index i. Flipping bit k of element i
changes it by +-2^k * (2i + 1), never 0 mod 2^32 (an odd number times 2^k, k < 32), so every
single-bit error is caught; the position weight also catches elements that moved (a float sum
would be blind to flips that round away, and to moves). The sum is computed where the arrays
are, on the devices (the sharded reduction is one small all-reduce), or on the host one slice
at a time for the converter's streamed writes: both give the same value for the same bits.
One sum, not two: XLA:CPU reduces integers about 15x slower than floats, and a reduction is
the whole cost (docs/benchmarks.md).
"""

import jax
import jax.numpy as jnp
import numpy as np

_MASK = 0xFFFFFFFF


def leaf_name(path) -> str:
    """'layers/attn/wq' for a tree path of dict keys, attribute names or indices."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _unsigned(dtype) -> np.dtype:
    size = np.dtype(dtype).itemsize
    if size > 4:
        raise ValueError(f"fingerprints cover arrays of at most 32-bit elements, not {dtype}")
    return np.dtype(f"uint{8 * size}")


def _device_sum(x: jax.Array) -> jax.Array:
    x = jax.device_put(x, jax.memory.Space.Device)  # a leaf kept in host memory is summed on its device
    bits = jax.lax.bitcast_convert_type(x, _unsigned(x.dtype)) if x.dtype != jnp.bool_ else x
    bits = bits.astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)  # the flat index mod 2^32, without an iota longer than 2^32
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride & _MASK)
        stride *= x.shape[d]
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_device_tree_sums = jax.jit(lambda leaves: [_device_sum(x) for x in leaves])


def fingerprints(tree) -> dict[str, str]:
    """{leaf name: 8 hex digits} of every array leaf of `tree`, computed on its devices."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_device_tree_sums([leaf for _, leaf in named]))
    return {leaf_name(path): _hex(s) for (path, _), s in zip(named, sums)}


class HostFingerprint:
    """One array's fingerprint from slices added in any order (the converter writes a stacked
    [layers, ...] leaf one layer at a time): `add(slice, start)` each, then `hex()`."""

    def __init__(self):
        self.sum = np.uint64(0)

    def add(self, values: np.ndarray, start: int = 0) -> None:
        """`values`: the elements at flat indices start, start + 1, ... of the whole array."""
        values = np.ascontiguousarray(values)
        bits = values.reshape(-1).view(_unsigned(values.dtype)).astype(np.uint64)
        index = np.arange(start, start + bits.size, dtype=np.uint64)
        weight = (index * np.uint64(2) + np.uint64(1)) & np.uint64(_MASK)
        with np.errstate(over="ignore"):  # uint64 wraps mod 2^64, which keeps the sum mod 2^32
            self.sum += np.sum(bits * weight, dtype=np.uint64)

    def hex(self) -> str:
        return _hex(self.sum)


def _hex(total) -> str:
    return f"{int(total) & _MASK:08x}"


def mismatches(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Leaf names whose fingerprint differs (or that are missing) among `actual`'s leaves."""
    return sorted(name for name, value in actual.items() if expected.get(name) != value)

"""Fingerprints of saved arrays: a checksum of each array's bits that any single flipped bit changes.

A fingerprint is two 32-bit sums over an array's elements viewed as unsigned integers of their
own width: sum(bits[i] * m(i)) mod 2^32 for two multipliers m that are odd for every flat index
i. Flipping bit k of element i changes that term by +-2^k * m(i), which is never 0 mod 2^32 for
odd m and k < 32, so every single-bit error is caught (and a float sum, which is blind to
flips that round away, is not used). The sums are computed where the arrays are, on the
devices (the sharded reduction is one small all-reduce), or on the host one slice at a time
for the converter's streamed writes: both give the same value for the same bits.
"""

import jax
import jax.numpy as jnp
import numpy as np

_MASK = 0xFFFFFFFF
_GOLDEN, _OFFSET = 0x9E3779B1, 0x7F4A7C15  # the second multiplier's hash of the index


def leaf_name(path) -> str:
    """'layers/attn/wq' for a tree path of dict keys, attribute names or indices."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _unsigned(dtype) -> np.dtype:
    size = np.dtype(dtype).itemsize
    if size > 4:
        raise ValueError(f"fingerprints cover arrays of at most 32-bit elements, not {dtype}")
    return np.dtype(f"uint{8 * size}")


def _device_sums(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x, _unsigned(x.dtype)) if x.dtype != jnp.bool_ else x
    bits = bits.astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)  # the flat index mod 2^32, without an iota longer than 2^32
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride & _MASK)
        stride *= x.shape[d]
    m1 = index * jnp.uint32(2) + jnp.uint32(1)
    m2 = (index * jnp.uint32(_GOLDEN) + jnp.uint32(_OFFSET)) | jnp.uint32(1)
    return jnp.stack([jnp.sum(bits * m1, dtype=jnp.uint32), jnp.sum(bits * m2, dtype=jnp.uint32)])


_device_tree_sums = jax.jit(lambda leaves: [_device_sums(x) for x in leaves])


def fingerprints(tree) -> dict[str, str]:
    """{leaf name: 16 hex digits} of every array leaf of `tree`, computed on its devices."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_device_tree_sums([leaf for _, leaf in named]))
    return {leaf_name(path): _hex(s) for (path, _), s in zip(named, sums)}


class HostFingerprint:
    """One array's fingerprint from slices added in any order (the converter writes a stacked
    [layers, ...] leaf one layer at a time): `add(slice, start)` each, then `hex()`."""

    def __init__(self):
        self.sums = np.zeros(2, np.uint64)

    def add(self, values: np.ndarray, start: int = 0) -> None:
        """`values`: the elements at flat indices start, start + 1, ... of the whole array."""
        values = np.ascontiguousarray(values)
        bits = values.reshape(-1).view(_unsigned(values.dtype)).astype(np.uint64)
        index = np.arange(start, start + bits.size, dtype=np.uint64)
        m1 = (index * np.uint64(2) + np.uint64(1)) & np.uint64(_MASK)
        m2 = ((index * np.uint64(_GOLDEN) + np.uint64(_OFFSET)) & np.uint64(_MASK)) | np.uint64(1)
        with np.errstate(over="ignore"):  # uint64 wraps mod 2^64, which keeps the sums mod 2^32
            self.sums += np.array([np.sum(bits * m1, dtype=np.uint64), np.sum(bits * m2, dtype=np.uint64)])

    def hex(self) -> str:
        return _hex(self.sums & np.uint64(_MASK))


def _hex(sums) -> str:
    return "".join(f"{int(s) & _MASK:08x}" for s in np.asarray(sums))


def mismatches(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Leaf names whose fingerprint differs (or that are missing) among `actual`'s leaves."""
    return sorted(name for name, value in actual.items() if expected.get(name) != value)

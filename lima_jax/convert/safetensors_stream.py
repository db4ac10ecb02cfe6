"""One safetensors file written tensor by tensor (the exports' writer): the header with every
offset goes first, then each tensor's bytes as it arrives."""

import json

import numpy as np
from etils import epath

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class SafetensorsStream:
    """One safetensors file written tensor by tensor: every name, shape and dtype is known up
    front, so the header (with all data offsets) goes first and each tensor's bytes are
    appended as it arrives; nothing but the current tensor is held in memory."""

    def __init__(self, path: epath.Path, tensors: list[tuple[str, tuple[int, ...], int]], dtype: str):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in tensors:
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
        self.expected = [(name, shape) for name, shape, _ in tensors]
        self.f = path.open("wb")
        self.f.write(len(blob).to_bytes(8, "little") + blob)

    def add(self, name: str, w: np.ndarray):
        want_name, want_shape = self.expected.pop(0)
        assert (name, tuple(w.shape)) == (want_name, tuple(want_shape)), (name, w.shape, want_name, want_shape)
        w = np.ascontiguousarray(w)
        self.f.write(w.reshape(-1).view(np.uint8).data)  # little-endian hosts, as safetensors stores

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.f.close()
        if exc_type is None:
            assert not self.expected, f"tensors never written: {[n for n, _ in self.expected][:5]}"

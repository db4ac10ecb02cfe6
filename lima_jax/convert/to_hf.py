"""Orbax checkpoint (converted or trained) -> Hugging Face folder, one tensor at a time.

Writes `config.json` (LlamaForCausalLM), `generation_config.json`, safetensors shards with
`model.safetensors.index.json` and the tokenizer files (`tokenizer_files`: the checkpoint's
stored tokenizer by default, EOT as a special token and LIMA's chat template). Vocabulary
padding is trimmed (the EOT row stays: vocab 32,001). A fine-tuned model's `eos_token_id` is
[EOS, EOT] in both configs, so `generate` stops at the end of a turn, and its generation config
carries LIMA's decoding (`LIMA_DECODING`; transformers' repetition penalty also counts the
prompt's tokens, LIMA's only the answer's). Every tensor's name, shape and size are known from the
config, so the shards are planned up front (at most `max_shard_bytes` each, whole layers in
order), each file's header is written first and each HF tensor is then read alone from the
checkpoint (`checkpoint.ParamsReader`: one layer's slice of a stacked leaf), converted and
appended. Host memory is about one layer's tensor, whatever the depth or the shard size.
A LoRA checkpoint exports merged: its base's tensors plus the adapters (`params_reader`).
"""

import json
import logging

import numpy as np
from etils import epath

from lima_jax import checkpoint, storage
from lima_jax.convert.errors import ConversionError
from lima_jax.convert.hf_config import BOS_ID, stop_ids, write_hf_config
from lima_jax.convert.layout import LAYOUT, get_path
from lima_jax.convert.safety import export_target, writing_into
from lima_jax.convert.tokenizer_files import TOKENIZER_MODEL, hf_tokenizer_files, processor
from lima_jax.hostmem import bound_heap
from lima_jax.model import ModelConfig, abstract_params
from lima_jax.sampling.decoding import LIMA

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
LIMA_DECODING = LIMA.generation_config()  # LIMA's decoding, written once (sampling.decoding), for transformers


def generation_config(eot_id: int | None) -> dict:
    """A fine-tuned model stops at EOT or EOS and samples as LIMA does; a base model keeps
    transformers' defaults."""
    config = {"bos_token_id": BOS_ID, "eos_token_id": stop_ids(eot_id)}
    return config if eot_id is None else {**config, **LIMA_DECODING}


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def export_order(cfg: ModelConfig) -> list[tuple]:
    """(LAYOUT entry, layer) in the order HF folders keep them: embedding, then layer by layer, then
    the final norm and the head (so each safetensors shard holds whole, consecutive layers)."""
    outside = [t for t in LAYOUT if not t.per_layer]
    stacked = [t for t in LAYOUT if t.per_layer]
    first = [(t, None) for t in outside if t.path == ("embed",)]
    last = [(t, None) for t in outside if t.path != ("embed",)]
    return first + [(t, i) for i in range(cfg.n_layers) for t in stacked] + last


def plan_shards(tensors: list[tuple[str, tuple[int, ...], int]], max_bytes: int) -> list[list[tuple]]:
    """Split (name, shape, nbytes) in order into shards of at most `max_bytes` (a bigger tensor
    gets a shard of its own), as `save_pretrained(max_shard_size=...)` does."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t[2] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t[2]
    return [s for s in shards if s]


class _SafetensorsStream:
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


def export_hf(checkpoint_path, output, *, tokenizer=None, dtype: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = 5 << 30) -> dict:
    """Write the HF folder for the checkpoint at `checkpoint_path` (work dir, manager root or step).

    `dtype` (float32 / bfloat16 / float16) defaults to the checkpoint's param_dtype. Atomic:
    written to `<output>.tmp-export` and renamed when complete. Host memory: one tensor (one
    layer's slice of a stacked leaf, read alone from the checkpoint) at a time."""
    out, tmp = export_target(checkpoint_path, output, overwrite=overwrite)
    meta = checkpoint.read_meta(checkpoint_path)
    if not meta.model:
        raise ConversionError(f"{checkpoint_path}: its meta item has no model config")
    cfg = ModelConfig.from_config(meta.model)
    dtype = dtype or cfg.param_dtype
    np_dtype = _np_dtype(dtype)
    proto = _tokenizer_proto(tokenizer, meta, checkpoint_path)
    eot_id = _eot_id(meta, cfg, proto)
    tok_files = {} if proto is None else hf_tokenizer_files(proto, eot_id, cfg.vocab_size, cfg.max_seq_len)
    bound_heap()
    reader = params_reader(checkpoint_path, meta)
    abstract = abstract_params(cfg)
    for entry in LAYOUT:  # the checkpoint holds what its meta says, before anything is written
        stored, spec = reader.array(entry.path), get_path(abstract, entry.path)
        if tuple(stored.shape) != tuple(spec.shape):
            raise ConversionError(f"{checkpoint_path}: params {'.'.join(entry.path)} is {tuple(stored.shape)}, "
                                  f"but its meta's model config implies {tuple(spec.shape)}")

    order = export_order(cfg)
    tensors = [(entry.hf_name(i), entry.hf_shape(cfg), int(np.prod(entry.hf_shape(cfg))) * np_dtype.itemsize)
               for entry, i in order]
    shards = plan_shards(tensors, max_shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]

    with writing_into(tmp, out):
        todo = iter(order)
        for name, shard in zip(names, shards):
            with _SafetensorsStream(tmp / name, shard, dtype) as stream:
                for _ in shard:
                    entry, i = next(todo)
                    w = entry.to_hf(reader.read(entry.path, i), cfg).astype(np_dtype, copy=False)
                    stream.add(entry.hf_name(i), w)
                    del w
        total = sum(t[2] for t in tensors)
        weight_map = {t[0]: name for name, shard in zip(names, shards) for t in shard}
        (tmp / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        (tmp / "config.json").write_text(json.dumps(write_hf_config(cfg, dtype, eot_id), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(eot_id), indent=2))
        for name, contents in tok_files.items():
            (tmp / name).write_bytes(contents)
    return {"model": cfg, "bytes_written": total, "files": len(shards), "output": str(out), "tokenizer": bool(tok_files)}


def params_reader(checkpoint_path, meta: checkpoint.CheckpointMeta):
    """The checkpoint's tensors; for a LoRA checkpoint, its base's with the adapters merged in."""
    if not meta.lora:
        return checkpoint.ParamsReader(checkpoint_path)
    from lima_jax.convert.lora_export import MergedReader

    return MergedReader(checkpoint_path, meta)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in ("float32", "float16"):
        raise ConversionError(f"--dtype={name!r}; choose float32, bfloat16 or float16")
    return np.dtype(name)


def _eot_id(meta: checkpoint.CheckpointMeta, cfg: ModelConfig, proto: bytes | None) -> int | None:
    """The checkpoint's EOT id; for one that records none but has one row more than its
    tokenizer's pieces (written before eot_id was recorded), EOT = the piece count, as in training."""
    if meta.eot_id is not None or proto is None:
        return meta.eot_id
    pieces = processor(proto, "the checkpoint's tokenizer").get_piece_size()
    return pieces if cfg.vocab_size == pieces + 1 else None


def _tokenizer_proto(tokenizer, meta: checkpoint.CheckpointMeta, checkpoint_path) -> bytes | None:
    """`tokenizer` (a SentencePiece model, or a folder holding tokenizer.model) wins; else the
    one stored in the checkpoint; else the training config's tokenizer_path; else None, warned."""
    if tokenizer is not None:
        path = storage.path(tokenizer)
        path = path / TOKENIZER_MODEL if path.is_dir() else path
        if not path.is_file():
            raise ConversionError(f"--tokenizer={tokenizer}: no SentencePiece model there")
        return path.read_bytes()
    if meta.tokenizer is not None:
        return meta.tokenizer
    saved = ((meta.config or {}).get("data") or {}).get("tokenizer_path")
    if saved:
        return storage.path(saved).read_bytes()
    log.warning("%s stores no tokenizer and no --tokenizer was given: the export has no tokenizer files",
                checkpoint_path)
    return None

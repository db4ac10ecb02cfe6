"""Orbax checkpoint (converted or trained) -> Hugging Face folder, one tensor at a time.

Writes `config.json` (LlamaForCausalLM), `generation_config.json`, safetensors shards with
`model.safetensors.index.json` and, if given, the tokenizer. Vocabulary padding is trimmed
(the EOT row stays: vocab 32,001). Every tensor's name, shape and size are known from the
config, so the shards are planned up front (at most `max_shard_bytes` each, whole layers in
order), each file's header is written first and each HF tensor is then read alone from the
checkpoint (`checkpoint.ParamsReader`: one layer's slice of a stacked leaf), converted and
appended. Host memory is about one layer's tensor, whatever the depth or the shard size.
"""

import json
import pathlib
import shutil

import numpy as np

from lima_jax import checkpoint
from lima_jax.hostmem import bound_heap
from lima_jax.convert.layout import LAYOUT, get_path
from lima_jax.convert.sources import ConversionError
from lima_jax.model import ModelConfig, abstract_params

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BOS_ID, EOS_ID = 1, 2  # LLaMA's SentencePiece ids


def hf_config(cfg: ModelConfig, dtype: str, eot_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": 0.02, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "use_cache": True,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID if eot_id is None else [EOS_ID, eot_id],
        "torch_dtype": dtype,
    }


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

    def __init__(self, path: pathlib.Path, tensors: list[tuple[str, tuple[int, ...], int]], dtype: str):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in tensors:
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
        self.expected = [(name, shape) for name, shape, _ in tensors]
        self.f = open(path, "wb")
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
    out = pathlib.Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    meta = checkpoint.read_meta(checkpoint_path)
    if not meta.model:
        raise ConversionError(f"{checkpoint_path}: its meta item has no model config")
    cfg = ModelConfig.from_config(meta.model)
    dtype = dtype or cfg.param_dtype
    np_dtype = _np_dtype(dtype)
    tok_files = _tokenizer_files(tokenizer)
    bound_heap()
    reader = checkpoint.ParamsReader(checkpoint_path)
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

    tmp = out.parent / f"{out.name}.tmp-export"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
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
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype, meta.eot_id), indent=2))
        gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID if meta.eot_id is None else [EOS_ID, meta.eot_id]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for f, name in tok_files:
            shutil.copy2(f, tmp / name)
        if tok_files and not any(name == "tokenizer_config.json" for _, name in tok_files):
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                 "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"model": cfg, "bytes_written": total, "files": len(shards), "output": str(out)}


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in ("float32", "float16"):
        raise ConversionError(f"--dtype={name!r}; choose float32, bfloat16 or float16")
    return np.dtype(name)


def _tokenizer_files(tokenizer) -> list[tuple[pathlib.Path, str]]:
    """(source, name in the export) for a SentencePiece model file or a folder's tokenizer files."""
    if tokenizer is None:
        return []
    p = pathlib.Path(tokenizer)
    if p.is_file():
        return [(p, "tokenizer.model")]
    if p.is_dir():
        files = [(p / name, name) for name in TOKENIZER_FILES if (p / name).is_file()]
        if files:
            return files
    raise ConversionError(f"--tokenizer={tokenizer}: no tokenizer.model (or tokenizer files) there")

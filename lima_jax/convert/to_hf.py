"""Orbax checkpoint (converted or trained) -> Hugging Face folder, one parameter group at a time.

Writes `config.json` (LlamaForCausalLM), `generation_config.json`, safetensors shards with
`model.safetensors.index.json` and, if given, the tokenizer. Vocabulary padding is trimmed
(the EOT row stays: vocab 32,001). Each group is restored alone (Orbax partial restore into
numpy), split into per-layer HF tensors and appended to the current shard, which is written
once it reaches `max_shard_bytes`; memory is about one group plus one shard.
"""

import json
import pathlib
import shutil

import numpy as np

from lima_jax import checkpoint
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


class _ShardWriter:
    def __init__(self, directory: pathlib.Path, max_bytes: int):
        self.dir, self.max_bytes = directory, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, w: np.ndarray):
        if self.pending and self.pending_bytes + w.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = np.ascontiguousarray(w)
        self.pending_bytes += w.nbytes
        self.total += w.nbytes

    def flush(self):
        from safetensors.numpy import save_file

        if not self.pending:
            return
        save_file(self.pending, str(self.dir / f"part-{len(self.files):05d}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self):
        self.flush()
        n = len(self.files)
        weight_map = {}
        for k, names in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / f"part-{k:05d}.safetensors").rename(self.dir / final)
            weight_map.update({name: final for name in names})
        (self.dir / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def export_hf(checkpoint_path, output, *, tokenizer=None, dtype: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = 5 << 30) -> dict:
    """Write the HF folder for the checkpoint at `checkpoint_path` (work dir, manager root or step).

    `dtype` (float32 / bfloat16 / float16) defaults to the checkpoint's param_dtype. Atomic:
    written to `<output>.tmp-export` and renamed when complete."""
    out = pathlib.Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    meta = checkpoint.read_meta(checkpoint_path)
    if "model" not in meta:
        raise ConversionError(f"{checkpoint_path}: its meta item has no model config")
    cfg = ModelConfig.from_config(meta["model"])
    dtype = dtype or cfg.param_dtype
    np_dtype = _np_dtype(dtype)
    tok_files = _tokenizer_files(tokenizer)

    tmp = out.parent / f"{out.name}.tmp-export"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        abstract = abstract_params(cfg)
        for entry in LAYOUT:
            subset: dict = {}
            node = subset
            for key in entry.path[:-1]:
                node = node.setdefault(key, {})
            node[entry.path[-1]] = get_path(abstract, entry.path)
            group = get_path(checkpoint.restore_params_subset(checkpoint_path, subset), entry.path)
            for i in entry.layers(cfg):
                w = group if i is None else group[i]
                writer.add(entry.hf_name(i), entry.to_hf(w, cfg).astype(np_dtype, copy=False))
            del group, subset, node
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype, meta.get("eot_id")), indent=2))
        gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID if meta.get("eot_id") is None else [EOS_ID, meta["eot_id"]]}
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
    return {"model": cfg, "bytes_written": writer.total, "files": len(writer.files), "output": str(out)}


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

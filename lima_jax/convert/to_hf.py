"""Orbax checkpoint (converted or trained) -> Hugging Face folder, one tensor at a time.

Writes `config.json` (the model's family: llama, qwen2 or qwen3), `generation_config.json`, safetensors shards with
`model.safetensors.index.json` and the tokenizer files (`tokenizer_files`: the checkpoint's
stored tokenizer by default, of its kind, with the chat template of the checkpoint's chat
format). Vocabulary padding is trimmed (the EOT row stays: vocab 32,001). A fine-tuned model's
`eos_token_id` is [EOS, end of turn] in both configs, so `generate` stops at the end of a turn, and its generation config
carries LIMA's decoding (`LIMA_DECODING`; transformers' repetition penalty also counts the
prompt's tokens, LIMA's only the answer's). Every tensor's name, shape and size are known from the
config, so the shards are planned up front (at most `max_shard_bytes` each, whole layers in
order), each file's header is written first and each HF tensor is then read alone from the
checkpoint (`model_store.params_reader`: one layer's slice of a stacked leaf), converted and
appended. Host memory is about one layer's tensor, whatever the depth or the shard size.
A LoRA checkpoint exports merged: its base's tensors plus the adapters (`model_store.params_reader`).
"""

import json
import logging
import sys

import numpy as np

from lima_jax import checkpoint, model_store
from lima_jax.convert.errors import ConversionError
from lima_jax.convert.hf_config import BOS_ID, EOS_ID, stop_ids, write_hf_config
from lima_jax.convert.layout import get_path, layout
from lima_jax.convert.safetensors_stream import SafetensorsStream
from lima_jax.convert.safety import export_target, writing_into
from lima_jax.convert.tokenizer_files import hf_tokenizer_files
from lima_jax.hostmem import bound_heap
from lima_jax.model import ModelConfig, abstract_params
from lima_jax.sampling.decoding import LIMA

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
LIMA_DECODING = LIMA.generation_config()  # LIMA's decoding, written once (sampling.decoding), for transformers


def generation_config(eot_id: int | None, bos_id: int | None = BOS_ID, eos_id: int | None = EOS_ID) -> dict:
    """A fine-tuned model stops at EOT or EOS and samples as LIMA does; a base model keeps
    transformers' defaults."""
    config = {"bos_token_id": bos_id, "eos_token_id": stop_ids(eot_id, eos_id)}
    return config if eot_id is None else {**config, **LIMA_DECODING}


def export_order(cfg: ModelConfig) -> list[tuple]:
    """(LAYOUT entry, layer) in the order HF folders keep them: embedding, then layer by layer, then
    the final norm and the head (so each safetensors shard holds whole, consecutive layers)."""
    outside = [t for t in layout(cfg) if not t.per_layer]
    stacked = [t for t in layout(cfg) if t.per_layer]
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


def export_hf(checkpoint_path, output, *, tokenizer=None, dtype: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = 5 << 30) -> dict:
    """Write the HF folder for the checkpoint at `checkpoint_path` (work dir, manager root or step).

    `dtype` (float32 / bfloat16 / float16) defaults to the checkpoint's param_dtype. Atomic:
    written to `<output>.tmp-export` and renamed when complete. Host memory: one tensor (one
    layer's slice of a stacked leaf, read alone from the checkpoint) at a time. The tensors read
    are checked against their fingerprints before the folder is committed: a damaged newest step
    of a work dir is passed over with a warning (`checkpoint.newest_good`), a damaged step named
    explicitly is refused."""
    out, tmp = export_target(checkpoint_path, output, overwrite=overwrite)
    return checkpoint.newest_good(
        checkpoint_path, lambda step: _export_step(step, out, tmp, tokenizer, dtype, max_shard_bytes),
        warn=lambda message: print(message, file=sys.stderr, flush=True))


def _export_step(checkpoint_path, out, tmp, tokenizer, dtype: str | None, max_shard_bytes: int) -> dict:
    meta = model_store.read_meta(checkpoint_path)
    cfg = meta.model
    dtype = dtype or cfg.param_dtype
    np_dtype = _np_dtype(dtype)
    chosen, why = model_store.choose_tokenizer(meta, checkpoint_path, tokenizer_path=None if tokenizer is None else
                                               str(tokenizer), required=False, check=False)  # hf_tokenizer_files checks
    if chosen is None:
        log.warning("%s: the export has no tokenizer files", why)
    eot_id = model_store.eot_id(meta, chosen)
    tok_files = {} if chosen is None else hf_tokenizer_files(chosen, eot_id, cfg.vocab_size, cfg.max_seq_len,
                                                             meta.chat_format)
    ids = {} if chosen is None else {"bos_id": chosen.bos_id, "eos_id": chosen.eos_id}
    bound_heap()
    reader = model_store.params_reader(checkpoint_path, meta)
    abstract = abstract_params(cfg)
    for entry in layout(cfg):  # the checkpoint holds what its meta says, before anything is written
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
            with SafetensorsStream(tmp / name, shard, dtype) as stream:
                for _ in shard:
                    entry, i = next(todo)
                    w = entry.to_hf(reader.read(entry.path, i), cfg).astype(np_dtype, copy=False)
                    stream.add(entry.hf_name(i), w)
                    del w
        total = sum(t[2] for t in tensors)
        weight_map = {t[0]: name for name, shard in zip(names, shards) for t in shard}
        (tmp / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        (tmp / "config.json").write_text(json.dumps(write_hf_config(cfg, dtype, eot_id, **ids), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(eot_id, **ids), indent=2))
        for name, contents in tok_files.items():
            (tmp / name).write_bytes(contents)
        reader.verify()  # before the rename: a damaged step leaves no output
    return {"model": cfg, "bytes_written": total, "files": len(shards), "output": str(out), "tokenizer": bool(tok_files)}


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in ("float32", "float16"):
        raise ConversionError(f"--dtype={name!r}; choose float32, bfloat16 or float16")
    return np.dtype(name)

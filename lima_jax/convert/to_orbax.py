"""Meta / Hugging Face folder -> Orbax checkpoint in the trainer's layout, streamed group by group.

A parameter group is one entry of `layout.LAYOUT` with all its layers stacked (e.g. every
layer's `w1`, [L, D, F]). The converter builds one group in a preallocated array, layer by
layer, hands it to `checkpoint.save_params_streaming` (Orbax partial save) and drops it
before reading the next, so host memory is about one group plus one layer, at any depth.
The result restores with `checkpoint.restore_params(path, abstract_params(cfg), shardings)`.
"""

import dataclasses
import time

import numpy as np

from lima_jax import checkpoint
from lima_jax.convert.layout import LAYOUT, get_path, grow_vocab
from lima_jax.convert.sources import ARCH_KEYS, ConversionError, open_source
from lima_jax.model import ModelConfig, abstract_params

PARAM_DTYPES = ("float32", "bfloat16")


def target_config(arch: dict, *, config: ModelConfig | None = None, add_eot: bool = False,
                  vocab_multiple: int | None = None, param_dtype: str | None = None, arch_file: str = "") -> ModelConfig:
    """The model config of the converted checkpoint: the source's architecture (plus EOT),
    checked against `config` when given (which then supplies the non-architecture fields)."""
    arch = dict(arch, vocab_size=arch["vocab_size"] + (1 if add_eot else 0))
    if config is not None:
        for key in ARCH_KEYS:
            ours, theirs = getattr(config, key), arch[key]
            if (not np.isclose(ours, theirs, rtol=1e-9, atol=0)) if isinstance(ours, float) else ours != theirs:
                hint = ""
                if key == "vocab_size" and ours == theirs + 1 and not add_eot:
                    hint = " (the config counts LIMA's EOT token: pass --add_eot)"
                raise ConversionError(f"config.model.{key}={ours} but {arch_file or 'the checkpoint'} gives "
                                      f"{key}={theirs}{' after --add_eot' if key == 'vocab_size' and add_eot else ''}{hint}")
        base = dataclasses.asdict(config)
    else:
        base = {}
    fields = {**base, **arch}
    if vocab_multiple is not None:
        fields["vocab_multiple"] = vocab_multiple
    if param_dtype is not None:
        if param_dtype not in PARAM_DTYPES:
            raise ConversionError(f"--param_dtype={param_dtype!r}; choose one of {PARAM_DTYPES}")
        fields["param_dtype"] = param_dtype
    return ModelConfig(**fields)


def iter_groups(source, cfg: ModelConfig, *, source_vocab: int, stats: dict | None = None):
    """Yield (params path, our stacked array in cfg.param_dtype) for every LAYOUT entry.

    Host memory: one group, plus one layer's temporaries. Source files are reopened for every
    tensor, so memory-mapped pages read earlier are released rather than piling up in RSS."""
    abstract = abstract_params(cfg)
    dtype = np.dtype(cfg.weight_dtype)

    def read(entry, i):
        with source.opened():
            w = source.read(entry, i)
        if stats is not None:
            stats["bytes_read"] = stats.get("bytes_read", 0) + w.nbytes
        return w

    for entry in LAYOUT:
        spec = get_path(abstract, entry.path)
        if not entry.per_layer:
            w = read(entry, None)
            if entry.vocab_rows:  # grow (EOT) and pad in one preallocated buffer, then our layout
                rows = np.zeros((cfg.padded_vocab_size, w.shape[1]), dtype)
                rows[:source_vocab] = w
                if cfg.vocab_size > source_vocab:
                    rows[source_vocab:cfg.vocab_size] = grow_vocab(w, cfg.vocab_size - source_vocab)[source_vocab:]
                del w
                w = rows
            out = entry.to_ours(w, cfg).astype(dtype, copy=False)  # lm_head: a transposed view, no copy
            del w
        else:
            out = np.empty(spec.shape, dtype)
            for i in entry.layers(cfg):
                out[i] = entry.to_ours(read(entry, i), cfg)
        assert out.shape == spec.shape, (entry.path, out.shape, spec.shape)
        yield entry.path, out
        del out
        _return_freed_memory()


def _return_freed_memory():
    """Hand freed heap pages back to the OS between groups (glibc keeps the per-thread arenas
    that tensorstore's writer threads used otherwise, and RSS creeps up group by group)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def convert_to_orbax(source: str, input_dir, output, *, config: ModelConfig | None = None, add_eot: bool = False,
                     vocab_multiple: int | None = None, param_dtype: str | None = None, overwrite: bool = False) -> dict:
    """Convert a Meta (`source="meta"`) or HF (`"hf"`) folder to an Orbax checkpoint at `output`.

    Returns a small report: the model config, bytes read, seconds. `add_eot` appends one
    vocabulary row (LIMA's end-of-turn id = the old vocabulary size) to the embedding and the
    output head, initialised to the mean of the existing rows."""
    from etils import epath

    out = epath.Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    start = time.perf_counter()
    src = open_source(source, input_dir)
    arch = src.arch()
    if vocab_multiple is None and config is None:
        vocab_multiple = 128
    cfg = target_config(arch, config=config, add_eot=add_eot, vocab_multiple=vocab_multiple,
                        param_dtype=param_dtype or (None if config is not None else "float32"),
                        arch_file=str(src.dir / src.arch_file))
    src.check(ModelConfig(**arch, vocab_multiple=1))
    meta = {"model": dataclasses.asdict(cfg),
            "converted_from": {"source": source, "input": str(input_dir), "source_vocab_size": arch["vocab_size"]}}
    if add_eot:
        meta["eot_id"] = arch["vocab_size"]
    stats: dict = {}
    checkpoint.save_params_streaming(out, iter_groups(src, cfg, source_vocab=arch["vocab_size"], stats=stats),
                                     meta, overwrite=overwrite)
    seconds = time.perf_counter() - start
    return {"model": cfg, "bytes_read": stats.get("bytes_read", 0), "seconds": seconds, "output": str(out)}

"""Meta / Hugging Face folder -> Orbax checkpoint in the trainer's layout, streamed layer by layer.

A parameter group is one entry of `layout.LAYOUT` with all its layers stacked (e.g. every
layer's `w1`, [L, D, F]). The stacked array is never built on the host: the converter reads
one layer's tensor, turns it into our layout and `checkpoint.save_params_streaming` writes it
into its slice `[i]` of the checkpoint's array before the next layer is read, so host memory
is about one layer's tensor (or the embedding) plus fixed overhead, at any depth. The result
restores with `checkpoint.restore_params(path, abstract_params(cfg), shardings)`.

The source's `tokenizer.json` or `tokenizer.model` (or `tokenizer=`) is stored in the checkpoint's meta, so
sampling and export use the tokenizer the weights were released with.
"""

import dataclasses
import logging
import time

import numpy as np

from lima_jax import checkpoint, model_store, storage
from lima_jax.convert.layout import get_path, layout, mean_row
from lima_jax.convert.safety import check_output_location
from lima_jax.convert.sources import ARCH_KEYS, ConversionError, open_source
from lima_jax.convert.tokenizer_files import find_source_tokenizer
from lima_jax.hostmem import bound_heap, return_freed_memory
from lima_jax.model import ModelConfig, abstract_params

log = logging.getLogger(__name__)

PARAM_DTYPES = ("float32", "bfloat16")


def target_config(arch: dict, *, config: ModelConfig | None = None, add_eot: bool = False,
                  vocab_multiple: int | None = None, param_dtype: str | None = None, arch_file: str = "") -> ModelConfig:
    """The model config of the converted checkpoint: the source's architecture (plus EOT) and
    RoPE scaling, the architecture checked against `config` when given (which then supplies
    the non-architecture fields)."""
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


def check_window(window: int | None, cfg: ModelConfig, where: str) -> None:
    """A sliding window no shorter than the context is full attention (Mistral as LLaMA); a
    shorter one would change the model's outputs."""
    if window is not None and window < cfg.max_seq_len:
        raise ConversionError(f"{where}: sliding_window={window} is shorter than the context "
                              f"(model.max_seq_len={cfg.max_seq_len}); the model attends over the whole context, "
                              f"so convert with a config whose model.max_seq_len is at most {window}")


def iter_leaves(source, cfg: ModelConfig, *, source_vocab: int, stats: dict | None = None):
    """Yield `(params path, ShapeDtypeStruct, slices)` for every LAYOUT entry, as
    `checkpoint.save_params_streaming` takes them: `slices` lazily yields `(layer, tensor)`
    in our layout, one layer of the stacked leaf at a time (`(None, tensor)` for a leaf
    outside the stack). Nothing is read before it is asked for.

    Host memory: one layer's tensor and its temporaries (for embed / lm_head: that one
    tensor). The source stays open throughout and releases the memory-mapped pages of each
    tensor once the next is read (see `sources`), so they do not pile up in RSS."""
    abstract = abstract_params(cfg)
    dtype = np.dtype(cfg.weight_dtype)

    def read(entry, i):
        w = source.read(entry, i)
        if stats is not None:
            stats["bytes_read"] = stats.get("bytes_read", 0) + w.nbytes
        return w

    def whole(entry):
        w = read(entry, None)
        if entry.vocab_rows:  # grow (EOT: the mean of the old rows) and pad in one preallocated buffer
            rows = np.zeros((cfg.padded_vocab_size, w.shape[1]), dtype)
            rows[:source_vocab] = w
            rows[source_vocab:cfg.vocab_size] = mean_row(w)
            del w
            w = rows
        out = entry.to_ours(w, cfg).astype(dtype, copy=False)  # lm_head: a transposed view, no copy
        del w
        yield None, out

    def per_layer(entry, spec):
        for i in entry.layers(cfg):
            out = entry.to_ours(read(entry, i), cfg).astype(dtype, copy=False)
            assert out.shape == spec.shape[1:], (entry.path, i, out.shape, spec.shape)
            yield i, out
            del out
            return_freed_memory()

    with source.opened():  # each leaf's slices are consumed before the next leaf is asked for
        for entry in layout(cfg):
            spec = get_path(abstract, entry.path)
            yield entry.path, spec, (per_layer(entry, spec) if entry.per_layer else whole(entry))
            return_freed_memory()


def convert_to_orbax(source: str | None, input_dir, output, *, config: ModelConfig | None = None, add_eot: bool = False,
                     vocab_multiple: int | None = None, param_dtype: str | None = None, overwrite: bool = False,
                     tokenizer=None) -> dict:
    """Convert a Meta (`source="meta"`) or HF (`"hf"`; None: told by its files) folder to an Orbax
    checkpoint at `output`.

    Returns a small report: the model config, bytes read, seconds, whether a tokenizer was
    stored. `add_eot` appends one vocabulary row (LIMA's end-of-turn id = the old vocabulary
    size) to the embedding and the output head, initialised to the mean of the existing rows.
    `tokenizer`: the tokenizer to store (a tokenizer.model, a tokenizer.json or a folder; default:
    the one shipped with the weights). One with its own end-of-turn token (Llama 3's
    `<|eot_id|>`, Qwen's `<|im_end|>`) needs no new row: `add_eot` then adds none (logged). An HF
    folder's generation stop ids (`generation_eos_ids`) go into `meta.source`, so sampling the
    converted model stops where transformers' `generate` does."""
    check_output_location(input_dir, output, overwrite=overwrite)
    out = checkpoint.as_path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    start = time.perf_counter()
    bound_heap()
    with storage.local_copy(input_dir) as local_input:  # the readers need real files (mmap)
        src = open_source(source, local_input)
        arch = src.arch()
        if vocab_multiple is None and config is None:
            vocab_multiple = 128
        tok = find_source_tokenizer(src.tokenizer(), tokenizer, vocab_size=arch["vocab_size"],
                                    where_vocab=str(src.dir / src.arch_file))
        if add_eot and tok is not None and not tok.eot_added:
            log.info("the tokenizer already has an end-of-turn token (id %d): --add_eot adds no row", tok.eot_id)
            add_eot = False
        cfg = target_config(arch, config=config, add_eot=add_eot, vocab_multiple=vocab_multiple,
                            param_dtype=param_dtype or (None if config is not None else "float32"),
                            arch_file=str(src.dir / src.arch_file))
        check_window(getattr(src, "sliding_window", None), cfg, str(src.dir / src.arch_file))
        src.check(ModelConfig(**arch, vocab_multiple=1))
        eot_id = arch["vocab_size"] if add_eot else None if tok is None or tok.eot_added else tok.eot_id
        meta = model_store.CheckpointMeta(
            model=cfg, eot_id=eot_id, tokenizer=None if tok is None else tok.to_record(),
            chat_format=model_store.LIMA_FORMAT if add_eot else None,
            source={"converted_from": src.key, "input": str(input_dir), "source_vocab_size": arch["vocab_size"],
                    "generation_eos_ids": src.generation_eos_ids()})
        stats: dict = {}
        checkpoint.save_params_streaming(out, iter_leaves(src, cfg, source_vocab=arch["vocab_size"], stats=stats),
                                         meta.to_json(), overwrite=overwrite)
    seconds = time.perf_counter() - start
    return {"model": cfg, "bytes_read": stats.get("bytes_read", 0), "seconds": seconds, "output": str(out),
            "tokenizer": tok is not None}

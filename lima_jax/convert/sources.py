"""Readers for Meta's original release and Hugging Face folders, one tensor at a time.

Both present the same interface: `arch()` (the architecture as ModelConfig fields, read from
params.json / config.json), `check(cfg)` (every expected tensor present with the expected
shape, nothing unknown; raises with a message naming the file and the tensor) and, inside
`with source.opened():`, `read(entry, layer)` giving one tensor in Hugging Face's layout as a
numpy array of the stored dtype. Memory-mapped pages of a tensor stop counting in RSS once the
next one is read, so reading a whole model holds about one tensor: Meta's shards are opened
once and the pages of the tensor read last are handed back (`madvise(MADV_PAGEOUT)`; on
kernels without it, the shards are reopened for every tensor instead); a safetensors file is
opened for each tensor read from it (its header is all it parses).

Meta: `consolidated.NN.pth` files are model-parallel shards, loaded with
`torch.load(mmap=True, weights_only=True)` (no pickle code execution, no bulk read). A tensor
is the concatenation of its shards on `Tensor.meta_split_dim` (replicated tensors are taken
from shard 0), then q/k rows are permuted from Meta's interleaved RoPE to HF's rotate-half.
HF: `safetensors.safe_open` reads single tensors lazily; `model.safetensors.index.json`
names the shard of each tensor; `config.json` is read by `hf_config` (the family, RoPE
parameters old and new, tied embeddings: an `lm_head.weight` in the files is then ignored).

`tokenizer()` finds the SentencePiece model that ships with the weights: `tokenizer.model` in
the folder, or (Meta's layout: `llama/tokenizer.model` next to `llama/7B/`) in its parent.
"""

import contextlib
import json
import pathlib
import re

import numpy as np

from lima_jax.convert.errors import ConversionError
from lima_jax.convert.hf_config import DEFAULT_THETA, read_hf_arch
from lima_jax.convert.layout import IGNORED_HF_SUFFIXES, IGNORED_META, Tensor, ffn_dim_meta, layout
from lima_jax.model.config import ROPE_SCALING_KEYS, ModelConfig

# The architecture a source fixes and a given config must match; the RoPE scaling (ROPE_KEYS)
# always comes from the source (Llama 3 and 3.1 share a config but not a scaling).
ARCH_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta",
             "head_dim", "tied_embeddings", "qkv_bias", "qk_norm")
ROPE_KEYS = ROPE_SCALING_KEYS
TOKENIZER = "tokenizer.model"
__all__ = ["ARCH_KEYS", "ConversionError", "HFSource", "MetaSource", "open_source"]

def _to_numpy(t) -> np.ndarray:
    """A torch tensor -> numpy without changing bits (bfloat16 via ml_dtypes)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages; never discards data (unlike MADV_DONTNEED)


def _span(values) -> tuple[int, int]:
    """The address range covering the storages of the torch tensors among `values` (one
    memory-mapped file)."""
    import torch

    ranges = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
              for t in values if isinstance(t, torch.Tensor)]
    ranges = [(p, p + n) for p, n in ranges if n]
    return (min(p for p, _ in ranges), max(e for _, e in ranges)) if ranges else (0, 0)


def _page_out(start: int, end: int) -> bool:
    """Take the resident pages in [start, end) out of this process's RSS (MADV_PAGEOUT).

    Pages are reclaimed, never discarded: a clean file-backed page is read again on access, an
    anonymous one is swapped or stays. So this is safe on any range; False where the kernel
    does not know MADV_PAGEOUT."""
    import ctypes
    import mmap

    from lima_jax.hostmem import libc

    if end <= start:
        return True
    page = mmap.PAGESIZE
    lo, hi = start - start % page, -(-end // page) * page
    c = libc()
    if c is None:
        return False
    c.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return c.madvise(lo, hi - lo, _MADV_PAGEOUT) == 0


def _arch_cfg(arch: dict) -> ModelConfig:
    return ModelConfig(**arch, vocab_multiple=1)


class _Source:
    key, kind = "", ""  # --source's name, the name in messages
    arch_file = ""

    def __init__(self, directory):
        self.dir = pathlib.Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir} is not a directory")
        if not (self.dir / self.arch_file).is_file():
            raise ConversionError(f"{self.dir} has no {self.arch_file}: is this a {self.kind} checkpoint folder?")
        self._arch = self._read_arch(json.loads((self.dir / self.arch_file).read_text()))
        self._open = None

    def arch(self) -> dict:
        """ARCH_KEYS and ROPE_KEYS of the source (ModelConfig's defaults where it says nothing)."""
        cfg = _arch_cfg(self._arch)
        return {k: getattr(cfg, k) for k in ARCH_KEYS + ROPE_KEYS}

    def generation_eos_ids(self) -> list[int] | None:
        """The ids the source's own generation stops on, if it says (Meta's folders do not)."""
        return None

    def tokenizer(self) -> pathlib.Path | None:
        """The tokenizer shipped with the weights, if any: an HF tokenizer.json, else a tokenizer.model."""
        return next((d / name for d in self._tokenizer_dirs() for name in ("tokenizer.json", TOKENIZER)
                     if (d / name).is_file()), None)

    def _tokenizer_dirs(self) -> tuple[pathlib.Path, ...]:
        return (self.dir,)

    @contextlib.contextmanager
    def opened(self):
        self._open = self._open_files()
        try:
            yield self
        finally:
            self._release()
            self._open = None  # drops the memory maps

    def _release(self):
        pass

    def read(self, entry: Tensor, layer: int | None) -> np.ndarray:
        assert self._open is not None, "read inside `with source.opened():`"
        return self._read(entry, layer)


class MetaSource(_Source):
    key, kind = "meta", "Meta"
    arch_file = "params.json"

    def __init__(self, directory):
        super().__init__(directory)
        files = sorted(self.dir.glob("consolidated.*.pth"))
        if not files:
            raise ConversionError(f"{self.dir} has params.json but no consolidated.*.pth shards")
        numbers = []
        for f in files:
            m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
            if not m:
                raise ConversionError(f"unexpected shard file name {f}")
            numbers.append(int(m.group(1)))
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        if missing:
            raise ConversionError(f"{self.dir}: missing shard(s) " + ", ".join(f"consolidated.{n:02d}.pth" for n in missing)
                                  + f" (found {len(files)} of {max(numbers) + 1})")
        self.files = [self.dir / f"consolidated.{n:02d}.pth" for n in sorted(numbers)]
        self._spans: list = []  # per shard, the address range of its memory map
        self._touched = False  # read since the pages were last handed back
        self._reopen = False  # set when the kernel cannot page memory-mapped tensors out
        if self._arch["vocab_size"] <= 0:  # LLaMA-1's params.json says -1: the tensors know
            with self.opened():
                self._arch["vocab_size"] = int(self._open[0]["tok_embeddings.weight"].shape[0])

    def _tokenizer_dirs(self):
        return (self.dir, self.dir.parent)  # Meta ships one tokenizer.model beside the size folders

    def _read_arch(self, p: dict) -> dict:
        where = self.dir / "params.json"
        for field in ("use_scaled_rope", "rope_scaling"):  # LLaMA 3.1's scaled RoPE
            if p.get(field):
                raise ConversionError(f"{where}: {field}={p[field]!r}: Meta's scaled RoPE is not read from the "
                                      "original/ folder; convert the Hugging Face folder (config.json, "
                                      "*.safetensors, tokenizer.json) with --source hf")
        try:
            dim, n_heads = int(p["dim"]), int(p["n_heads"])
            arch = dict(vocab_size=int(p.get("vocab_size", -1)), dim=dim, n_layers=int(p["n_layers"]), n_heads=n_heads,
                        n_kv_heads=int(p.get("n_kv_heads") or n_heads),
                        ffn_dim=ffn_dim_meta(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier")),
                        norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", DEFAULT_THETA)))
        except KeyError as e:
            raise ConversionError(f"{where} lacks {e.args[0]!r}") from None
        return arch

    def _open_files(self):
        import torch

        shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in self.files]
        self._spans = [_span(sd.values()) for sd in shards]
        return shards

    def check(self, cfg: ModelConfig) -> None:
        """Shard shapes agree, merged shapes match params.json, no unknown keys."""
        expected = {t.meta_name(i): (t, i) for t in layout(cfg) for i in t.layers(cfg)}
        with self.opened():
            for f, sd in zip(self.files, self._open):
                unknown = sorted(k for k in sd if k not in expected and k not in IGNORED_META)
                if unknown:
                    raise ConversionError(f"{f}: unknown tensor(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
                absent = sorted(set(expected) - set(sd))
                if absent:
                    raise ConversionError(f"{f}: missing tensor(s) {absent[:5]}{' ...' if len(absent) > 5 else ''} "
                                          f"(params.json says n_layers={cfg.n_layers})")
            for name, (t, _layer) in expected.items():
                shapes = [tuple(sd[name].shape) for sd in self._open]
                if len(set(shapes)) > 1:
                    detail = ", ".join(f"{f.name}: {s}" for f, s in zip(self.files, shapes))
                    raise ConversionError(f"shards disagree in shape for {name}: {detail}")
                merged = list(shapes[0])
                if t.meta_split_dim is not None:
                    merged[t.meta_split_dim] *= len(shapes)
                want = t.hf_shape(cfg)
                if tuple(merged) != want:
                    raise ConversionError(
                        f"params.json does not match the tensors: {name} merged from {len(self.files)} shard(s) is "
                        f"{tuple(merged)} but params.json ({_describe(cfg)}) implies {want}; "
                        "check params.json and that no consolidated.*.pth shard is missing")

    def _release(self):
        """Hand back the pages read since the last call: the whole span of each shard's map, since
        the kernel maps pages around a faulting one too (clean, file-backed: re-read on access)."""
        touched, self._touched = self._touched, False
        if touched and not self._reopen and not all(_page_out(*span) for span in self._spans):
            self._reopen = True

    def _read(self, entry, layer):
        self._release()
        if self._reopen:  # no MADV_PAGEOUT: fresh maps for every tensor (torch.load parses each file again)
            self._open = self._open_files()
        self._touched = True
        name = entry.meta_name(layer)
        parts = [sd[name] for sd in self._open]
        if entry.meta_split_dim is None or len(parts) == 1:
            w = _to_numpy(parts[0])  # a view of the map: its pages go when the next tensor is read
        else:
            w = np.concatenate([_to_numpy(p) for p in parts], axis=entry.meta_split_dim)
            del parts
            self._release()  # copied out: the shards' pages can go now
        cfg = _arch_cfg(self._arch)
        return entry.meta_to_hf(w, cfg)


class HFSource(_Source):
    key, kind = "hf", "Hugging Face"
    arch_file = "config.json"
    INDEX = "model.safetensors.index.json"

    def __init__(self, directory):
        super().__init__(directory)
        index = self.dir / self.INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise ConversionError(f"{self.dir}: missing shard(s) {missing} listed in {self.INDEX}")
            self.where = {name: self.dir / f for name, f in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.dir} has no *.safetensors files (and no {self.INDEX})")
            from safetensors import safe_open

            self.where = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    self.where.update({k: f for k in h.keys()})

    def _read_arch(self, c: dict) -> dict:
        arch = read_hf_arch(c, str(self.dir / self.arch_file))
        self.sliding_window = arch.sliding_window
        return arch.fields

    def generation_eos_ids(self) -> list[int] | None:
        """`eos_token_id` of generation_config.json, else of config.json: what transformers'
        `generate` stops on (Llama 3.1 Instruct: end of text, <|eom_id|>, <|eot_id|>)."""
        for name in ("generation_config.json", self.arch_file):
            if (self.dir / name).is_file():
                ids = json.loads((self.dir / name).read_text()).get("eos_token_id")
                if ids is not None:
                    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]
        return None

    def _open_files(self):
        from safetensors import safe_open

        return {f: safe_open(f, framework="pt") for f in sorted(set(self.where.values()))}

    def check(self, cfg: ModelConfig) -> None:
        expected = {t.hf_name(i): t for t in layout(cfg) for i in t.layers(cfg)}
        ignored = {"lm_head.weight"} if cfg.tied_embeddings else set()  # older saves keep the tied copy
        unknown = sorted(k for k in self.where
                         if k not in expected and k not in ignored and not k.endswith(IGNORED_HF_SUFFIXES))
        if unknown:
            raise ConversionError(f"{self.dir}: unknown tensor(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        absent = sorted(set(expected) - set(self.where))
        if absent:
            raise ConversionError(f"{self.dir}: missing tensor(s) {absent[:5]}{' ...' if len(absent) > 5 else ''}")
        with self.opened():
            for name, t in expected.items():
                shape = tuple(self._open[self.where[name]].get_slice(name).get_shape())
                if shape != t.hf_shape(cfg):
                    raise ConversionError(f"config.json does not match the tensors: {name} in {self.where[name].name} "
                                          f"is {shape} but config.json ({_describe(cfg)}) implies {t.hf_shape(cfg)}")

    def _read(self, entry, layer):
        from safetensors import safe_open

        name = entry.hf_name(layer)
        with safe_open(self.where[name], framework="pt") as h:  # its own map, gone after this tensor
            return _to_numpy(h.get_tensor(name))


def _describe(cfg: ModelConfig) -> str:
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in ARCH_KEYS[:6])


SOURCES = {"meta": MetaSource, "hf": HFSource}


def detect_source(directory) -> str:
    """"hf" for a folder with config.json, "meta" for one with params.json, else ConversionError."""
    found = [kind for kind, cls in SOURCES.items() if (pathlib.Path(directory) / cls.arch_file).is_file()]
    if len(found) != 1:
        raise ConversionError(f"{directory}: {'both' if found else 'neither'} config.json (Hugging Face) "
                              f"{'and' if found else 'nor'} params.json (Meta): pass --source hf or --source meta")
    return found[0]


def open_source(kind: str | None, directory) -> _Source:
    """The reader of `directory`; `kind` None: told by its files (`detect_source`)."""
    kind = kind or detect_source(directory)
    if kind not in SOURCES:
        raise ConversionError(f"--source={kind!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[kind](directory)

"""What the conversion tests build and read: Meta-format folders written from a reference model
(and the configs sized for Meta's params.json), tokenizers trained for them, safetensors read
back, restoring a converted checkpoint, and `launch/sample.py` run as a CLI. Not a test module:
test modules import from here, never from each other.

Meta-format folders are built from a random HF model the way Meta's release stores them:
q/k rows in Meta's interleaved-RoPE order, column-parallel tensors split on dim 0, row-parallel
ones and the embedding on dim 1, norms replicated, bfloat16-free float32 `.pth` shards."""

import io
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import sentencepiece as spm
import torch
from safetensors import safe_open

from lima_jax import checkpoint
from lima_jax.convert.layout import ffn_dim_meta, hf_to_meta_rope, layout
from lima_jax.model import ModelConfig, abstract_params, param_logical_axes
from lima_jax.sharding import make_mesh, named_shardings
from tests.conftest import ROOT

jax.config.update("jax_default_matmul_precision", "highest")

# Meta's params.json derives the MLP width; these sizes are chosen so that it does.
CONVERT_MHA = ModelConfig(vocab_size=248, dim=64, n_layers=3, n_heads=4, n_kv_heads=4, ffn_dim=ffn_dim_meta(64, 32),
                          norm_eps=1e-5, vocab_multiple=16)
CONVERT_GQA = ModelConfig(vocab_size=256, dim=96, n_layers=2, n_heads=6, n_kv_heads=2,
                          ffn_dim=ffn_dim_meta(96, 64, 1.3), norm_eps=1e-5, rope_theta=500000.0, vocab_multiple=16)
META_EXTRA = {id(CONVERT_MHA): dict(multiple_of=32), id(CONVERT_GQA): dict(multiple_of=64, ffn_dim_multiplier=1.3)}
TOKENS = np.random.default_rng(0).integers(0, 248, (2, 23))  # Meta splits the vocab: 248 = 8 x 31
MAX_NEW = 12  # sample_cli's default answer length


def write_meta(model, cfg: ModelConfig, directory: pathlib.Path, n_shards: int) -> pathlib.Path:
    """A Meta release folder: params.json + consolidated.NN.pth, split as Meta's model parallelism does."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shards = [{} for _ in range(n_shards)]
    for t in layout(cfg):
        for i in (range(cfg.n_layers) if t.per_layer else [None]):
            w = sd[t.hf_name(i)]
            if t.rope_heads:
                w = torch.from_numpy(hf_to_meta_rope(w.numpy(), getattr(cfg, t.rope_heads)))
            parts = [w] * n_shards if t.meta_split_dim is None else torch.chunk(w, n_shards, dim=t.meta_split_dim)
            for shard, part in zip(shards, parts):
                shard[t.meta_name(i)] = part.clone().contiguous()
    for k, shard in enumerate(shards):
        shard["rope.freqs"] = torch.zeros(cfg.head_dim // 2)  # LLaMA-1 ships this; converters ignore it
        torch.save(shard, directory / f"consolidated.{k:02d}.pth")
    params = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, **META_EXTRA[id(cfg)])
    (directory / "params.json").write_text(json.dumps(params))
    return directory


def train_tokenizer(pieces: int, *, byte_fallback: bool = False) -> bytes:
    """A tiny BPE SentencePiece model with LLaMA's settings (BOS 1, EOS 2, no normalization)."""
    from lima_jax.data.demo import demo_conversations

    text = [t for turns in demo_conversations() for t in turns]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, minloglevel=2, vocab_size=pieces, model_type="bpe",
        byte_fallback=byte_fallback, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False)
    proto = model.getvalue()
    assert spm.SentencePieceProcessor(model_proto=proto).get_piece_size() == pieces
    return proto


def stored_proto(meta) -> bytes:
    """The SentencePiece proto a checkpoint's meta stores (as its tokenizer record)."""
    from lima_jax.data.tokenizer import tokenizer_from_record

    return tokenizer_from_record(meta.tokenizer).proto


def restore(path, cfg: ModelConfig):
    tensor = 2 if cfg.n_kv_heads % 4 else 4
    mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": tensor})
    shardings = named_shardings(param_logical_axes(cfg), mesh)
    params = checkpoint.restore_params(path, abstract_params(cfg), shardings)
    leaf = params["layers"]["mlp"]["w1"]
    assert leaf.sharding == shardings["layers"]["mlp"]["w1"]  # restored straight into the target sharding
    return params


def read_safetensors(directory) -> dict:
    out = {}
    for f in sorted(pathlib.Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="np") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def sample_cli(ckpt, prompt: str, *extra: str, turns=(), fmt="raw", max_new: int = MAX_NEW) -> tuple[str, int]:
    """(answer, answer tokens) from `launch/sample.py --greedy --repetition_penalty 1.0` (`fmt`
    None: the checkpoint's chat format)."""
    cmd = [sys.executable, str(ROOT / "launch" / "sample.py"), "--checkpoint", str(ckpt),
           *(["--format", fmt] if fmt else []), "--greedy", "--repetition_penalty", "1.0",
           "--max_new_tokens", str(max_new), "--nostream", "--prompt", prompt,
           *[f"--turn={t}" for t in turns], *extra]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = re.search(r"\[(\d+) prompt tokens, (\d+) answer tokens", result.stderr)
    assert counts, result.stderr[-2000:]
    return result.stdout.removesuffix("\n"), int(counts.group(2))

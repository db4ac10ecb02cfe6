"""Checkpoint conversion against Hugging Face transformers (the independent reference).

Meta-format folders are built (tests/convert_fixtures.py) from a random HF model the way Meta's release stores them:
q/k rows in Meta's interleaved-RoPE order, column-parallel tensors split on dim 0, row-parallel
ones and the embedding on dim 1, norms replicated, bfloat16-free float32 `.pth` shards.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lima_jax import checkpoint, model_store
from lima_jax.convert import ConversionError, convert_to_orbax, export_hf
from lima_jax.convert.layout import hf_to_meta_rope
from lima_jax.model import ModelConfig, abstract_params
from tests.conftest import ROOT
from tests.convert_fixtures import (
    CONVERT_GQA as GQA,
    CONVERT_MHA as MHA,
    TOKENS,
    read_safetensors,
    restore,
    stored_proto,
    train_tokenizer,
    write_meta,
)
from tests.references import hf_logits, hf_model, our_logits

jax.config.update("jax_default_matmul_precision", "highest")

@pytest.fixture(scope="module")
def mha_model():
    return hf_model(MHA, seed=1)


def test_meta_permutation_is_metas_interleaved_rope():
    """hf_to_meta_rope against Meta's own complex-number RoPE and HF's rotate-half: same scores."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_heads, hd, d, s = 2, 8, 16, 5
    g = torch.Generator().manual_seed(0)
    wq, wk, x = torch.randn(n_heads * hd, d, generator=g), torch.randn(n_heads * hd, d, generator=g), torch.randn(s, d, generator=g)
    pos = torch.arange(s).float()
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(pos, inv)

    def meta_rope(w):  # Meta llama/model.py: apply_rotary_emb on interleaved pairs
        q = (x @ w.T).view(s, n_heads, hd // 2, 2)
        q = torch.view_as_real(torch.view_as_complex(q) * torch.polar(torch.ones_like(freqs), freqs)[:, None, :])
        return q.reshape(s, n_heads, hd).transpose(0, 1)

    emb = torch.cat([freqs, freqs], -1)
    q_hf = (x @ wq.T).view(s, n_heads, hd).transpose(0, 1)[None]
    k_hf = (x @ wk.T).view(s, n_heads, hd).transpose(0, 1)[None]
    q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, emb.cos()[None], emb.sin()[None])
    q_meta = meta_rope(torch.from_numpy(hf_to_meta_rope(wq.numpy(), n_heads)))
    k_meta = meta_rope(torch.from_numpy(hf_to_meta_rope(wk.numpy(), n_heads)))
    torch.testing.assert_close(q_meta @ k_meta.transpose(-1, -2), (q_hf @ k_hf.transpose(-1, -2))[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_shards_give_hf_logits(tmp_path, mha_model, n_shards):
    src = write_meta(mha_model, MHA, tmp_path / "meta", n_shards)
    convert_to_orbax("meta", src, tmp_path / "ckpt", vocab_multiple=MHA.vocab_multiple)
    assert model_store.read_meta(tmp_path / "ckpt").model.n_layers == MHA.n_layers
    params = restore(tmp_path / "ckpt", MHA)
    np.testing.assert_allclose(our_logits(MHA, params, TOKENS), hf_logits(mha_model, TOKENS), atol=1e-4, rtol=0)


def test_meta_grouped_query_two_shards(tmp_path):
    model = hf_model(GQA, seed=2)
    src = write_meta(model, GQA, tmp_path / "meta", 2)
    convert_to_orbax("meta", src, tmp_path / "ckpt", vocab_multiple=GQA.vocab_multiple)
    params = restore(tmp_path / "ckpt", GQA)
    np.testing.assert_allclose(our_logits(GQA, params, TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_hf_round_trip_is_bitwise_and_loads_in_transformers(tmp_path, mha_model):
    mha_model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", vocab_multiple=MHA.vocab_multiple)
    params = restore(tmp_path / "ckpt", MHA)
    np.testing.assert_allclose(our_logits(MHA, params, TOKENS), hf_logits(mha_model, TOKENS), atol=1e-4, rtol=0)

    report = export_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=100_000)
    assert report["files"] > 1
    original, exported = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for name, w in original.items():
        assert exported[name].dtype == w.dtype and exported[name].shape == w.shape, name
        assert exported[name].tobytes() == w.tobytes(), name
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), hf_logits(mha_model, TOKENS))


def test_add_eot_grows_vocab_with_mean_rows_and_export_keeps_it(tmp_path, mha_model):
    src = write_meta(mha_model, MHA, tmp_path / "meta", 2)
    proto = train_tokenizer(MHA.vocab_size)
    (tmp_path / "tokenizer.model").write_bytes(proto)  # beside the Meta folder, as Meta ships it
    convert_to_orbax("meta", src, tmp_path / "ckpt", add_eot=True, vocab_multiple=128)
    meta = model_store.read_meta(tmp_path / "ckpt")
    cfg = meta.model
    v = MHA.vocab_size  # the EOT id
    assert (cfg.vocab_size, cfg.padded_vocab_size, meta.eot_id, stored_proto(meta)) == (v + 1, 256, v, proto)
    assert meta.chat_format == "lima"
    params = restore(tmp_path / "ckpt", cfg)
    embed, head = np.asarray(params["embed"]), np.asarray(params["lm_head"])
    sd = mha_model.state_dict()
    hf_embed, hf_head = sd["model.embed_tokens.weight"].numpy(), sd["lm_head.weight"].numpy()
    np.testing.assert_array_equal(embed[:v], hf_embed)
    np.testing.assert_allclose(embed[v], hf_embed.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(head[:, v], hf_head.mean(0), rtol=1e-6, atol=1e-7)
    assert not embed[v + 1:].any() and not head[:, v + 1:].any()  # padding rows
    # the old tokens' logits are unchanged; the EOT logit is the mean of the old logits
    ours = our_logits(cfg, params, TOKENS)
    np.testing.assert_allclose(ours[..., :v], hf_logits(mha_model, TOKENS), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[..., v], ours[..., :v].mean(-1), atol=1e-4, rtol=0)

    export_hf(tmp_path / "ckpt", tmp_path / "out")  # the stored tokenizer by default
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["vocab_size"] == v + 1 and hf_cfg["eos_token_id"] == [2, v]
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == proto
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    eot_tokens = np.concatenate([TOKENS, np.full((2, 1), v)], axis=1)
    np.testing.assert_allclose(hf_logits(reloaded, eot_tokens), our_logits(cfg, params, eot_tokens), atol=1e-4, rtol=0)


def test_bfloat16_params(tmp_path, mha_model):
    mha_model.save_pretrained(tmp_path / "hf")
    convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", param_dtype="bfloat16", vocab_multiple=16)
    cfg = model_store.read_meta(tmp_path / "ckpt").model
    assert cfg.param_dtype == "bfloat16"
    params = restore(tmp_path / "ckpt", cfg)
    assert params["layers"]["attn"]["wq"].dtype == jnp.bfloat16
    w = mha_model.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["w2"][1], np.float32), w.T)


# ---- errors ------------------------------------------------------------------------------------

def test_missing_shard(tmp_path, mha_model):
    src = write_meta(mha_model, MHA, tmp_path / "meta", 4)
    (src / "consolidated.02.pth").unlink()
    with pytest.raises(ConversionError, match=r"missing shard.*consolidated\.02\.pth"):
        convert_to_orbax("meta", src, tmp_path / "ckpt")
    (src / "consolidated.03.pth").unlink()  # now 00, 01: numbering is fine, the shapes are not
    with pytest.raises(ConversionError, match="params.json does not match.*shard is missing"):
        convert_to_orbax("meta", src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_shards_disagree_in_shape(tmp_path, mha_model):
    src = write_meta(mha_model, MHA, tmp_path / "meta", 2)
    shard = torch.load(src / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wq.weight"] = shard["layers.1.attention.wq.weight"][:-2]
    torch.save(shard, src / "consolidated.01.pth")
    with pytest.raises(ConversionError, match=r"shards disagree in shape for layers\.1\.attention\.wq\.weight"):
        convert_to_orbax("meta", src, tmp_path / "ckpt")


def test_params_json_does_not_match_tensors(tmp_path, mha_model):
    src = write_meta(mha_model, MHA, tmp_path / "meta", 1)
    p = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**p, "multiple_of": 256}))
    with pytest.raises(ConversionError, match=r"params.json does not match the tensors: .*feed_forward\.w1"):
        convert_to_orbax("meta", src, tmp_path / "ckpt")
    (src / "params.json").write_text(json.dumps({**p, "n_layers": 4}))
    with pytest.raises(ConversionError, match=r"missing tensor.*layers\.3\..*n_layers=4"):
        convert_to_orbax("meta", src, tmp_path / "ckpt")


def test_unknown_key(tmp_path, mha_model):
    src = write_meta(mha_model, MHA, tmp_path / "meta", 1)
    shard = torch.load(src / "consolidated.00.pth", weights_only=True)
    shard["layers.0.attention.bias"] = torch.zeros(3)
    torch.save(shard, src / "consolidated.00.pth")
    with pytest.raises(ConversionError, match=r"unknown tensor.*layers\.0\.attention\.bias"):
        convert_to_orbax("meta", src, tmp_path / "ckpt")
    mha_model.save_pretrained(tmp_path / "hf")
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(3)}, tmp_path / "hf" / "extra.safetensors")
    with pytest.raises(ConversionError, match=r"unknown tensor.*q_proj\.bias"):
        convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt")


def test_existing_target_and_failed_conversion_leave_no_checkpoint(tmp_path, mha_model, monkeypatch):
    mha_model.save_pretrained(tmp_path / "hf")
    convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")

    from lima_jax.convert import sources

    calls = {"n": 0}
    original = sources.HFSource._read

    def failing(self, entry, layer):
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError("disk went away")
        return original(self, entry, layer)

    monkeypatch.setattr(sources.HFSource, "_read", failing)
    with pytest.raises(OSError, match="disk went away"):
        convert_to_orbax("hf", tmp_path / "hf", tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no partial folder anywhere
    calls["n"] = 0
    with pytest.raises(OSError):
        convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", overwrite=True)
    checkpoint.restore_params(tmp_path / "ckpt", abstract_params(ModelConfig(**{**MHA.__dict__, "vocab_multiple": 128})),
                              jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                           abstract_params(ModelConfig(**{**MHA.__dict__, "vocab_multiple": 128}))))


def test_config_check_names_the_key(tmp_path, mha_model):
    mha_model.save_pretrained(tmp_path / "hf")
    other = ModelConfig(**{**MHA.__dict__, "n_layers": 5})
    with pytest.raises(ConversionError, match=r"config.model.n_layers=5 but .*config.json gives n_layers=3"):
        convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", config=other)
    lima = ModelConfig(**{**MHA.__dict__, "vocab_size": MHA.vocab_size + 1})
    with pytest.raises(ConversionError, match=r"config.model.vocab_size=249 .*pass --add_eot"):
        convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", config=lima)
    assert not (tmp_path / "ckpt").exists()


def test_cli_with_config_file(tmp_path, mha_model):
    mha_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "cfg.py").write_text(
        "from lima_jax.config import base_config, set_llama\n"
        "def get_config():\n"
        f"    c = set_llama(base_config(), dim={MHA.dim}, n_layers=5, n_heads={MHA.n_heads}, ffn_dim={MHA.ffn_dim})\n"
        f"    c.model.update(vocab_size={MHA.vocab_size + 1}, norm_eps={MHA.norm_eps}, param_dtype='bfloat16')\n"
        "    return c\n")
    cmd = [sys.executable, str(ROOT / "launch" / "convert_checkpoint.py"), "--source", "hf", "--input",
           str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"), "--config", str(tmp_path / "cfg.py"),
           "--config.model.n_layers=3", "--add_eot", "--tokenizer", str(tmp_path / "given.model")]
    (tmp_path / "given.model").write_bytes(train_tokenizer(MHA.vocab_size))
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MB/s" in result.stdout and "tokenizer stored" in result.stdout
    meta = model_store.read_meta(tmp_path / "ckpt")
    model = meta.model
    assert (model.vocab_size, model.vocab_multiple, model.param_dtype) == (MHA.vocab_size + 1, 128, "bfloat16")
    assert (meta.eot_id, stored_proto(meta)) == (MHA.vocab_size, (tmp_path / "given.model").read_bytes())

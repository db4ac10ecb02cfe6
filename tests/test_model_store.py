"""The model store: the typed meta record (and checkpoints written before it was typed);
load_model's LoRA checkpoint against an independent merge (numpy: W + a b * alpha / rank), its
fallback past a damaged step, and its refusal of a LoRA base replaced by other weights."""

import base64
import dataclasses
import shutil

import jax
import numpy as np
import pytest

from lima_jax import checkpoint, model_store
from lima_jax.data import demo
from lima_jax.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from lima_jax.errors import DamagedCheckpoint, LoraBaseChanged
from lima_jax.model import init_params, lora as lora_lib
from lima_jax.model.config import ModelConfig
from tests.checkpoint_faults import flip_bit, stored_arrays

TOKENIZER = load_tokenizer("")  # the demo tokenizer
CFG = ModelConfig(vocab_size=TOKENIZER.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  vocab_multiple=8, max_seq_len=64)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down", "head"), base_dtype="float32")


def proto() -> bytes:
    with open(demo.build_demo_tokenizer(), "rb") as f:
        return f.read()


def test_a_meta_written_before_it_was_typed_reads_as_typed(tmp_path):
    """The JSON today's training wrote: model and lora as plain dicts, the tokenizer a bare base64
    proto, no chat_format."""
    old = {"model": dataclasses.asdict(CFG), "step": 7, "eot_id": TOKENIZER.eot_id,
           "tokenizer": base64.b64encode(proto()).decode("ascii"), "config": {"seed": 3}, "run": {"seed": 3},
           "source": {"from": "train"},
           "lora": dict(LORA.to_dict(), base_checkpoint="/base", base_seed=3)}
    params = jax.device_get(init_params(CFG, jax.random.key(0)))
    checkpoint.save_params(tmp_path / "old", params, old)
    meta = model_store.read_meta(tmp_path / "old")
    assert meta.model == CFG and meta.step == 7 and meta.eot_id == TOKENIZER.eot_id
    assert meta.tokenizer == proto()  # the bare proto older checkpoints store
    assert meta.chat_format == "lima"  # a model with EOT speaks LIMA's format
    assert meta.lora == model_store.LoraRecord(LORA, "/base", 3, None)
    assert (meta.config, meta.run, meta.source) == ({"seed": 3}, {"seed": 3}, {"from": "train"})
    base_model = dict(old, eot_id=None, lora=None)
    assert model_store.CheckpointMeta.from_json(base_model).chat_format is None
    assert model_store.CheckpointMeta.from_json(meta.to_json()) == meta  # and today's record round-trips


def test_load_model_merges_a_lora_checkpoint_as_numpy_does(tmp_path):
    base = jax.device_get(init_params(CFG, jax.random.key(1)))
    model_store.save_params(tmp_path / "base", base, model_store.CheckpointMeta(model=CFG))
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                            lora_lib.abstract_adapters(CFG, LORA))
    meta = model_store.CheckpointMeta(model=CFG, eot_id=TOKENIZER.eot_id,
                                      tokenizer=SentencePieceTokenizer(proto()).to_record(),
                                      lora=model_store.LoraRecord(LORA, str(tmp_path / "base")))
    model_store.save_params(tmp_path / "lora", adapters, meta, step=5)

    loaded = model_store.load_model(tmp_path / "lora")
    assert loaded.step == 5 and loaded.adapters is None and loaded.eot_id == TOKENIZER.eot_id
    assert loaded.tokenizer.num_pieces == TOKENIZER.num_pieces
    expected = jax.tree.map(np.array, base)  # writable copies
    for name in LORA.targets:  # W + a b * alpha / rank, one layer at a time
        path, lead, _ = lora_lib.target_path(name)
        a, b = (lora_lib.get_path(adapters, path)[k] for k in ("a", "b"))
        w = lora_lib.get_path(expected, path)
        for i in range(CFG.n_layers) if lead else [None]:
            ai, bi = (a, b) if i is None else (a[i], b[i])
            delta = (ai.reshape(-1, LORA.rank) @ bi.reshape(LORA.rank, -1)).reshape(w.shape[lead:]) * LORA.scale
            if i is None:
                w += delta
            else:
                w[i] += delta
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
                 jax.device_get(loaded.params), expected)

    apart = model_store.load_model(tmp_path / "lora", merge_lora=False)  # the base as trained, adapters beside it
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(apart.params), jax.tree.map(np.asarray, base))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(apart.adapters), adapters)


def test_load_model_steps_back_past_a_damaged_step_and_refuses_it_by_name(tmp_path):
    params = jax.device_get(init_params(CFG, jax.random.key(2)))
    meta = model_store.CheckpointMeta(model=CFG, eot_id=TOKENIZER.eot_id,
                                      tokenizer=SentencePieceTokenizer(proto()).to_record())
    model_store.save_params(tmp_path / "ckpt", params, meta, step=3)
    shutil.copytree(tmp_path / "ckpt" / "3", tmp_path / "ckpt" / "7")  # a later step, then a bit flips
    flip_bit(tmp_path / "ckpt" / "7" / "params", stored_arrays(tmp_path / "ckpt" / "7" / "params")[0])
    warnings = []
    loaded = model_store.load_model(tmp_path / "ckpt", warn=warnings.append)
    assert loaded.step == 3 and len(warnings) == 1 and "step 7 is damaged" in warnings[0]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), params)
    with pytest.raises(DamagedCheckpoint, match="named explicitly"):
        model_store.load_model(tmp_path / "ckpt" / "7")


def test_a_lora_checkpoint_refuses_a_replaced_base(tmp_path):
    base = tmp_path / "base"
    model_store.save_params(base, jax.device_get(init_params(CFG, jax.random.key(1))), model_store.CheckpointMeta(model=CFG))
    record = model_store.LoraRecord(LORA, str(base), 0, checkpoint.params_fingerprint(base))
    adapters = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), lora_lib.abstract_adapters(CFG, LORA))
    meta = model_store.CheckpointMeta(model=CFG, eot_id=TOKENIZER.eot_id,
                                      tokenizer=SentencePieceTokenizer(proto()).to_record(), lora=record)
    model_store.save_params(tmp_path / "lora", adapters, meta)
    assert model_store.load_model(tmp_path / "lora").step == 0
    shutil.rmtree(base)  # other weights copied over the base
    model_store.save_params(base, jax.device_get(init_params(CFG, jax.random.key(9))), model_store.CheckpointMeta(model=CFG))
    with pytest.raises(LoraBaseChanged, match=f"{tmp_path / 'lora'}.* trained on the base {base} .*now holds other"):
        model_store.load_model(tmp_path / "lora")
    # a LoRA resume compares the same way (the base named by the config, as it is now)
    now = dataclasses.replace(record, base_fingerprint=checkpoint.params_fingerprint(base))
    with pytest.raises(LoraBaseChanged):
        model_store.check_resumed_base(tmp_path / "lora" / "0", now)
    model_store.check_resumed_base(tmp_path / "lora" / "0", dataclasses.replace(now, base_checkpoint="/elsewhere"))

"""A LoRA checkpoint decodes unmerged (its frozen base as trained, int8 kept in int8, the
adapters beside it) and gives the tokens of the same model merged on the host (MergedReader:
numpy's W + a b * alpha / rank)."""

import jax
import numpy as np
import pytest

from lima_jax import model_store
from lima_jax.model import abstract_params, init_params, lora as lora_lib
from lima_jax.model.weights import LoraWeight, QuantizedWeight
from lima_jax.sampling import SamplingSettings
from lima_jax.sampling.sampler import Sampler, load_sampler
from tests.test_model_store import CFG, LORA, TOKENIZER

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("base_dtype", ["int8"])  # bfloat16: test_lora_e2e.py against PEFT
def test_unmerged_lora_decodes_as_the_host_merge(tmp_path, base_dtype):
    lora = lora_lib.LoraConfig(LORA.rank, LORA.alpha, targets=LORA.targets, base_dtype=base_dtype)
    meta = model_store.CheckpointMeta(model=CFG, eot_id=TOKENIZER.eot_id, tokenizer=TOKENIZER.to_record())
    model_store.save_params(tmp_path / "base", jax.device_get(init_params(CFG, jax.random.key(0))), meta)
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32),
                            lora_lib.abstract_adapters(CFG, lora))
    lora_meta = model_store.CheckpointMeta(model=CFG, eot_id=TOKENIZER.eot_id, tokenizer=TOKENIZER.to_record(),
                                           lora=model_store.LoraRecord(lora, str(tmp_path / "base")))
    model_store.save_params(tmp_path / "lora", adapters, lora_meta, step=1)

    sampler, _ = load_sampler(str(tmp_path / "lora"))
    wq = sampler.params["layers"]["attn"]["wq"]
    assert isinstance(wq, LoraWeight)  # unmerged: the base and its adapter apart
    if base_dtype == "int8":
        assert isinstance(wq.base, QuantizedWeight) and wq.base.values.dtype == np.int8

    reader = model_store.MergedReader(tmp_path / "lora" / "1", lora_meta)
    merged = jax.tree_util.tree_map_with_path(lambda path, _: reader.read(tuple(k.key for k in path)),
                                              abstract_params(CFG))
    reference = Sampler(CFG, merged, sampler.tokenizer, chat_format=sampler.chat_format)
    prompts = [rng.integers(3, CFG.vocab_size, n).tolist() for n in (5, 17, 9)]
    settings = SamplingSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=12)
    ours = sampler.generate_ids(prompts, settings)
    assert ours == reference.generate_ids(prompts, settings)
    assert sum(len(o["ids"]) for o in ours) > 12  # they say something before a stop token

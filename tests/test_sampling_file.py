"""The host side of sampling: checkpoint -> Sampler (config from meta), LIMA prompt format,
answering a jsonl file in batches (answers do not depend on the batch), streaming."""

import json

import jax
import pytest

from lima_jax import checkpoint
from lima_jax.config import base_config, model_config
from lima_jax.model import init_params
from lima_jax.sampling import SamplingSettings
from lima_jax.sampling.sampler import answer_file, load_sampler

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, shared_dir):
    c = base_config()
    c.model.update(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, dtype="float32")  # vocab 32,001
    c.data.tokenizer_path = str(shared_dir / "llama" / "tokenizer.model")
    c.mesh.update(data=2, fsdp=2, tensor=2)
    cfg = model_config(c)
    params = init_params(cfg, jax.random.key(0))
    path = tmp_path_factory.mktemp("ckpt")
    checkpoint.save_params(path / "with_config", params,
                           checkpoint.CheckpointMeta(model={}, config=json.loads(c.to_json_best_effort())))
    checkpoint.save_params(path / "model_only", params, checkpoint.CheckpointMeta(model=cfg.__dict__))
    return path, c


def test_answer_file_in_batches_equals_one_by_one(ckpt, tmp_path):
    path, c = ckpt
    sampler, config = load_sampler(str(path / "with_config"))  # config and tokenizer from the checkpoint
    assert dict(config.mesh)["tensor"] == 2 and sampler.mesh.shape["tensor"] == 2
    tok = sampler.tokenizer
    assert sampler.prompt_ids("Hi there") == [1] + tok.encode("Hi there") + [32000]
    assert sampler.prompt_ids(["Hi", "Hello", "Why?"]) == [1] + tok.encode("Hi") + [32000] + tok.encode("Hello") + \
        [32000] + tok.encode("Why?") + [32000]
    assert sampler.prompt_ids("Hi there", fmt="raw") == [1] + tok.encode("Hi there")
    assert sampler.stop_ids == (2, 32000)

    lines = [["What is a cat?"], ["Hi", "Hello! How can I help?", "Tell me a story about a dog."], ["Why?"],
             ["Give me three reasons to learn JAX, and explain each one briefly."], ["Ok"]]
    prompts = tmp_path / "test.jsonl"
    prompts.write_text("".join(json.dumps({"conversations": t, "source": ""}) + "\n" for t in lines))
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0)  # sampled
    summary = answer_file(sampler, str(prompts), str(tmp_path / "answers.jsonl"), settings, batch_size=4, seed=3,
                          progress=False)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(answers) == len(lines)
    for i, (turns, a) in enumerate(zip(lines, answers)):
        assert a["conversations"] == turns and a["prompt"] == turns[-1] and a["line"] == i + 1
        assert a["prompt_tokens"] == len(sampler.prompt_ids(turns))
        assert a["settings"]["top_p"] == 0.9 and a["settings"]["seed"] == 3 and a["settings"]["max_new_tokens"] == 6
        # the same prompt alone, with its row id as stream, gets the same answer
        [alone] = sampler.generate_ids([sampler.prompt_ids(turns)], settings, seed=3, row_ids=[i])
        assert a["answer_tokens"] == len(alone["ids"]) and a["answer"] == tok.decode(alone["ids"])
        assert a["stopped"] == alone["stopped"]


def test_config_from_model_meta_and_streaming(ckpt, shared_dir):
    path, _ = ckpt
    sampler, config = load_sampler(str(path / "model_only"), tokenizer_path=str(shared_dir / "llama" / "tokenizer.model"),
                                   mesh_overrides=dict(fsdp=-1))
    assert sampler.cfg.dim == 32 and sampler.cfg.remat_policy == "none"
    pieces = []
    settings = SamplingSettings(max_new_tokens=8, greedy=True)
    out = sampler.answer("Tell me a joke.", settings, stream=pieces.append)
    assert "".join(pieces) == out["answer"] and out["answer_tokens"] == 8
    [ids] = sampler.generate_ids([sampler.prompt_ids("Tell me a joke.")], settings)
    assert sampler.tokenizer.decode(ids["ids"]) == out["answer"]

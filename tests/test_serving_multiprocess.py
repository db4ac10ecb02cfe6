"""launch/serve.py on two processes (jax.distributed on CPU, 4 devices each, one 8-device
mesh): both run the engine, process 0 serves HTTP and broadcasts the requests; concurrent
greedy and seeded answers equal the Sampler's on one process, an echoed prompt's scores equal
the model's forward pass, and stopping process 0 stops process 1."""

import concurrent.futures
import signal
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import openai
import pytest

from lima_jax import model_store
from lima_jax.data import demo
from lima_jax.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from lima_jax.model import ModelConfig, bind, init_params
from lima_jax.sampling import SamplingSettings
from lima_jax.sampling.sampler import load_sampler
from tests.conftest import ROOT, cpu_env
from tests.serving_fixtures import free_port

PROMPTS = [["Hi there"], ["What is a cat?", "A pet.", "Why?"], ["Tell me a long story about dogs and cats please"]]
MAX_NEW = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tokenizer = load_tokenizer("")
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      vocab_multiple=8, max_seq_len=128, dtype="float32")
    with open(demo.build_demo_tokenizer(), "rb") as f:
        proto = f.read()
    path = tmp_path_factory.mktemp("mp") / "ckpt"
    meta = model_store.CheckpointMeta(model=cfg, eot_id=tokenizer.eot_id, tokenizer=SentencePieceTokenizer(proto).to_record())
    model_store.save_params(path, jax.device_get(init_params(cfg, jax.random.key(3))), meta)
    return str(path)


def test_two_processes_serve_as_one(ckpt, tmp_path):
    port, coordinator = free_port(), f"localhost:{free_port()}"
    env = cpu_env(4)
    logs = [(tmp_path / f"serve{i}.log").open("w") for i in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "launch" / "serve.py"), "--checkpoint", ckpt, "--port",
                               str(port), "--coordinator_address", coordinator, "--num_processes", "2",
                               "--process_id", str(i)], cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in (0, 1)]
    read_logs = lambda: "\n".join((tmp_path / f"serve{i}.log").read_text()[-2000:] for i in (0, 1))  # noqa: E731
    try:
        deadline = time.time() + 300
        while True:
            assert all(p.poll() is None for p in procs), read_logs()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, read_logs()
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        ask = lambda turns, **kw: client.chat.completions.create(  # noqa: E731
            model="ckpt", max_tokens=MAX_NEW, messages=[{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                                        for i, t in enumerate(turns)], **kw).choices[0].message.content
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            greedy = list(pool.map(lambda t: ask(t, temperature=0), PROMPTS))
            sampled = pool.submit(ask, PROMPTS[0], temperature=1.0, seed=4).result()
        echo = client.completions.create(model="ckpt", prompt=PROMPTS[2][0], echo=True, logprobs=1, max_tokens=0)

        sampler = load_sampler(ckpt)[0]  # one process, 8 devices
        refs = sampler.generate_ids([sampler.prompt_ids(t) for t in PROMPTS],
                                    SamplingSettings(greedy=True, max_new_tokens=MAX_NEW))
        assert greedy == [sampler.tokenizer.decode(r["ids"]) for r in refs]
        [ref] = sampler.generate_ids([sampler.prompt_ids(PROMPTS[0])],
                                     SamplingSettings(temperature=1.0, max_new_tokens=MAX_NEW), seed=4)
        assert sampled == sampler.tokenizer.decode(ref["ids"])
        ids = sampler.prompt_ids(PROMPTS[2][0], "raw")  # the prompt scored on both processes in lockstep
        logits = np.asarray(bind(sampler.cfg, jax.device_get(sampler.params))(np.asarray([ids])))[0].astype(np.float64)
        logits = logits[:, :sampler.cfg.vocab_size] - logits[:, :sampler.cfg.vocab_size].max(-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        scores = echo.choices[0].logprobs.token_logprobs
        assert scores[0] is None and len(scores) == len(ids)
        assert scores[1:] == pytest.approx([logprobs[i - 1, ids[i]] for i in range(1, len(ids))], abs=1e-4)

        procs[0].send_signal(signal.SIGINT)  # process 0 stops; its stop reaches process 1
        assert [p.wait(timeout=120) for p in procs] == [0, 0], read_logs()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()

"""Serving throughput on this machine: aggregate decode tokens/s of launch/serve.py with 1 and
with 16 concurrent clients (continuous batching; goal: at least 4x at 16), and the time to
first token, through the official `openai` client with streaming.

  python benchmarks/serving.py [--dim 256 --layers 4 --max_tokens 64 --requests 32]

The model has random weights (benchmarks/decode.py's shape: dim 256, 4 layers, LLaMA's
32,001-token vocabulary when ../shared has its tokenizer, else the demo tokenizer's); every
request is greedy with EOS and EOT banned by logit_bias, so each answer is exactly
`--max_tokens` tokens. The server runs on one CPU device (no emulated devices). Time to
first token: from sending the request to the first streamed token (the server has compiled
before it accepts requests). Writes benchmarks/results/serving.json.

  python benchmarks/serving.py --shared_prefix 500 --requests 16 --max_tokens 16

The prefix cache: 16 requests quote one 500-token text before their own question, one at a
time and all at once, against a server without and with `--prefix_cache_mib` (one request
primed the cache): time to first token, the prefills' model FLOPs (/health), and whether the
answers are the same tokens. Writes benchmarks/results/serving_prefix.json.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("DEFER_PYDANTIC_BUILD", "false")  # 16 threads parse at once: see lima_jax/evaluation/client.py

import httpx  # noqa: E402
import jax  # noqa: E402
import openai  # noqa: E402

from lima_jax import model_store  # noqa: E402
from lima_jax.data.tokenizer import load_tokenizer  # noqa: E402
from lima_jax.model import ModelConfig, init_params  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER = ROOT.parent / "shared" / "llama" / "tokenizer.model"
PROMPTS = ["Tell me about the sea.", "How do I bake bread?", "Why is the sky blue?", "Write a short poem about rain.",
           "What should I see in Paris?", "Explain recursion to a child.", "Give me three tips for sleep.",
           "What is a good name for a cat?"]


def build_checkpoint(path: pathlib.Path, dim: int, layers: int, max_seq_len: int = 512) -> ModelConfig:
    tokenizer_path = str(LLAMA_TOKENIZER) if LLAMA_TOKENIZER.is_file() else ""
    tokenizer = load_tokenizer(tokenizer_path)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=dim, n_layers=layers, n_heads=8, n_kv_heads=8,
                      ffn_dim=dim * 8 // 3 // 32 * 32, max_seq_len=max_seq_len, dtype="float32")
    meta = model_store.CheckpointMeta(model=cfg, eot_id=tokenizer.eot_id, tokenizer=tokenizer.to_record())
    model_store.save_params(path, jax.device_get(init_params(cfg, jax.random.key(0))), meta)
    return cfg, tokenizer


def start_server(ckpt: pathlib.Path, slots: int, log_path: pathlib.Path, prefix_cache_mib: int = 0
                 ) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "serve.py"), "--checkpoint", str(ckpt),
                             "--port", str(port), "--slots", str(slots), "--prefix_cache_mib", str(prefix_cache_mib)],
                            cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"),
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(log_path.read_text()[-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError("the server did not start")


def one_request(client: openai.OpenAI, prompt: str, max_tokens: int, banned: dict) -> dict:
    """Stream one answer: (time to first token, tokens, seconds, the tokens' strings)."""
    start = time.perf_counter()
    first, tokens, pieces = None, 0, []
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True, logprobs=True,
                                            logit_bias=banned, stream_options={"include_usage": True})
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                first = first or time.perf_counter() - start
                pieces += [t.token for t in choice.logprobs.content]
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first, "tokens": tokens, "seconds": time.perf_counter() - start, "pieces": pieces}


def phase(client, clients: int, requests: int, max_tokens: int, banned: dict) -> dict:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens, banned),
                                range(requests)))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    assert all(r["tokens"] == max_tokens for r in results), [r["tokens"] for r in results]
    ttfts = [r["ttft"] for r in results]
    return {"clients": clients, "requests": requests, "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_median_s": statistics.median(ttfts), "ttft_max_s": max(ttfts),
            "per_request_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in results)}


def shared_prefix(tokenizer, tokens: int, seed: int) -> str:
    """Text of about `tokens` tokens (a document every request quotes before its question)."""
    rng = random.Random(seed)
    words = ["river", "stone", "market", "lantern", "harbor", "engine", "garden", "ledger", "orchard", "signal"]
    text = ""
    while len(tokenizer.encode(text)) < tokens:
        text += " ".join(rng.choice(words) for _ in range(16)) + ".\n"
    return text


def prefix_phase(client, url: str, prefix: str, clients: int, requests: int, max_tokens: int, banned: dict,
                 tag: str) -> dict:
    """One request primes the cache with `prefix`, then `requests` requests (`clients` at a time)
    send it with their own question: their time to first token, and the prefills' model FLOPs."""
    one_request(client, prefix + PROMPTS[0], max_tokens, banned)
    before = httpx.get(f"{url}/health").json()["prefix_cache"]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(client, f"{prefix}{tag} {i}: {PROMPTS[i % len(PROMPTS)]}",
                                                      max_tokens, banned), range(requests)))
    after = httpx.get(f"{url}/health").json()["prefix_cache"]
    ttfts = [r["ttft"] for r in results]
    return {"ttft_median_s": statistics.median(ttfts), "ttft_max_s": max(ttfts),
            "prefill_flops": after["prefill_flops"] - before["prefill_flops"],
            "cache_hits_blocks": after["hits"] - before["hits"], "answers": [r["pieces"] for r in results]}


def prefix_benchmark(args, tmp: pathlib.Path, cfg, tokenizer) -> dict:
    """`--shared_prefix N`: `--requests` requests quoting one N-token document, one at a time and
    all at once, the server without and with a prefix cache (`--prefix_cache_mib`). Each
    measured phase comes after two unmeasured ones on other documents, so that the prefill
    shapes it needs have compiled."""
    banned = {str(tokenizer.eos_id): -100, str(tokenizer.eot_id): -100}
    out = {}
    for mib in (0, args.prefix_cache_mib):
        proc, url = start_server(tmp / "ckpt", args.slots, tmp / f"serve_{mib}.log", mib)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            for clients in (1, args.requests):
                for seed in (1, 2):
                    prefix_phase(client, url, shared_prefix(tokenizer, args.shared_prefix, 10 * clients + seed),
                                 clients, args.requests, args.max_tokens, banned, f"Warm-up {seed} question")
                out[mib, clients] = prefix_phase(client, url, shared_prefix(tokenizer, args.shared_prefix, clients),
                                                 clients, args.requests, args.max_tokens, banned, "Question")
            out[mib, "health"] = httpx.get(f"{url}/health").json()["prefix_cache"]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result = {"shared_prefix_tokens": len(tokenizer.encode(shared_prefix(tokenizer, args.shared_prefix, 1))),
              "requests": args.requests, "max_tokens": args.max_tokens, "prefix_cache_mib": args.prefix_cache_mib,
              "cache_at_the_end": out[args.prefix_cache_mib, "health"]}
    for clients, name in ((1, "one_at_a_time"), (args.requests, "all_at_once")):
        off, on = out[0, clients], out[args.prefix_cache_mib, clients]
        result[name] = {"without_cache": {k: v for k, v in off.items() if k != "answers"},
                        "with_cache": {k: v for k, v in on.items() if k != "answers"},
                        "ttft_speedup": off["ttft_median_s"] / on["ttft_median_s"],
                        "prefill_flops_ratio": on["prefill_flops"] / off["prefill_flops"],
                        "answers_identical": off["answers"] == on["answers"]}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32, help="requests of the 16-client phase (1 client: 1/4)")
    parser.add_argument("--shared_prefix", type=int, default=0,
                        help="N > 0: the prefix-cache benchmark instead (--requests requests quoting one N-token text)")
    parser.add_argument("--prefix_cache_mib", type=int, default=64, help="the prefix cache of --shared_prefix's run")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/serving.json "
                        "(serving_prefix.json with --shared_prefix)")
    args = parser.parse_args()
    output = pathlib.Path(args.output or ROOT / "benchmarks" / "results" /
                          ("serving_prefix.json" if args.shared_prefix else "serving.json"))

    with tempfile.TemporaryDirectory() as tmp:
        context = 512 if not args.shared_prefix else 1 << (args.shared_prefix + args.max_tokens + 64).bit_length()
        cfg, tokenizer = build_checkpoint(pathlib.Path(tmp) / "ckpt", args.dim, args.layers, context)
        if args.shared_prefix:
            result = prefix_benchmark(args, pathlib.Path(tmp), cfg, tokenizer)
            result["machine"] = {"cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
            output.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=2))
            return
        proc, url = start_server(pathlib.Path(tmp) / "ckpt", args.slots, pathlib.Path(tmp) / "serve.log")
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            banned = {str(tokenizer.eos_id): -100, str(tokenizer.eot_id): -100}  # every answer max_tokens long
            phase(client, 16, 16, 4, banned)  # warm: every prefill width and the HTTP path
            one = phase(client, 1, max(args.requests // 4, 2), args.max_tokens, banned)
            many = phase(client, 16, args.requests, args.max_tokens, banned)
            health = httpx.get(f"{url}/health").json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result = {
        "model": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "ffn": cfg.ffn_dim,
                  "vocab": cfg.vocab_size, "dtype": cfg.dtype},
        "slots": health["slots"], "max_tokens": args.max_tokens, "peak_active": health["peak_active"],
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
                    "load_average_1min": os.getloadavg()[0], "note": "shared, busy machine; one run"},
        "one_client": one, "sixteen_clients": many,
        "speedup_16_vs_1": many["tokens_per_s"] / one["tokens_per_s"],
    }
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"aggregate decode: {one['tokens_per_s']:.1f} tokens/s (1 client) -> {many['tokens_per_s']:.1f} "
          f"(16 clients), {result['speedup_16_vs_1']:.2f}x; time to first token {one['ttft_median_s'] * 1e3:.0f} ms "
          f"(1 client), {many['ttft_median_s'] * 1e3:.0f} ms median (16 clients)")


if __name__ == "__main__":
    main()

"""Decode speed on this machine: lima_jax's decode step (the slots sample.py, the chat and the
server run) vs transformers `generate`, and
the time per decoded token at 128 vs 1,024 tokens of context (the cache should make it
nearly flat; goal ratio < 1.5).

  python benchmarks/decode.py [--dim 256 --layers 4 --batch 4 --new 64]

Both sides run greedy decoding of the same random weights (HF LlamaForCausalLM mapped with
lima_jax.convert.layout), same batch and prompt, fixed number of new tokens, no stop token,
float32. Times exclude compilation (ours is run once before timing) and include our host loop
(one jitted step per token, its outputs read back). Writes
benchmarks/results/decode.json.
"""

import argparse
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lima_jax.convert.layout import params_from_hf  # noqa: E402
from lima_jax.model import ModelConfig  # noqa: E402
from lima_jax.sampling import SamplingSettings  # noqa: E402
from lima_jax.sampling.sampler import Sampler  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def hf_model(cfg):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False)).eval()


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class NoStops:
    """A tokenizer's ids for the Sampler; EOS and EOT outside the vocabulary: no stop token."""

    bos_id, eos_id, eot_id = 1, 10**9, 10**9


def ours(cfg, params, prompts, new, repeats):
    s = SamplingSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=new)
    sampler = Sampler(cfg, params, NoStops())
    run = lambda: sampler.generate_ids(prompts.tolist(), s, slots=len(prompts))  # noqa: E731
    out = run()  # compile
    return best_of(run, repeats), np.asarray([o["ids"] for o in out])


def theirs(model, prompts, new, repeats):
    ids = torch.tensor(prompts, dtype=torch.long)

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                  min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    out = run()  # warm-up
    return best_of(run, repeats), out[:, prompts.shape[1]:].numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32001)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.heads, ffn_dim=int(args.dim * 8 / 3 // 32 * 32), remat_policy="none")
    model = hf_model(cfg)
    params = jax.device_put(params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, cfg))
    rng = np.random.default_rng(0)
    results = dict(model=dict(dim=cfg.dim, layers=cfg.n_layers, heads=cfg.n_heads, ffn=cfg.ffn_dim,
                              vocab=cfg.vocab_size), batch=args.batch, new_tokens=args.new,
                   machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                                torch_threads=torch.get_num_threads(), jax=jax.__version__,
                                transformers=transformers.__version__))

    # 1. decode throughput, same batch and prompt length, both greedy
    prompts = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt))
    t_ours, tok_ours = ours(cfg, params, prompts, args.new, args.repeats)
    t_hf, tok_hf = theirs(model, prompts, args.new, args.repeats)
    n = args.batch * args.new
    results["throughput"] = dict(prompt_tokens=args.prompt, lima_jax_tokens_per_s=n / t_ours,
                                 transformers_tokens_per_s=n / t_hf, speedup=t_hf / t_ours,
                                 same_tokens=bool((tok_ours == tok_hf).all()))

    # 2. time per decoded token at two context lengths: (T(new + 1) - T(1)) / new removes prefill;
    # at the benchmark batch and for one sequence (the KV cache's share of memory traffic grows
    # with the batch, the weights' does not)
    per_token = {}
    for batch in sorted({args.batch, 1}, reverse=True):
        for context in (128, 1024):
            p = rng.integers(3, cfg.vocab_size, (batch, context))
            t_full, _ = ours(cfg, params, p, args.new + 1, args.repeats)
            t_prefill, _ = ours(cfg, params, p, 1, args.repeats)
            per_token[batch, context] = (t_full - t_prefill) / args.new
    results["per_token_ms"] = {f"batch{b}_context{c}": 1e3 * t for (b, c), t in per_token.items()}
    results["per_token_ratio_1024_vs_128"] = {f"batch{b}": per_token[b, 1024] / per_token[b, 128]
                                              for b in sorted({args.batch, 1}, reverse=True)}

    th = results["throughput"]
    print(f"model dim={cfg.dim} layers={cfg.n_layers} vocab={cfg.vocab_size}, batch {args.batch}, "
          f"{args.new} new tokens after {args.prompt}, greedy, float32")
    print(f"{'':28}{'tokens/s':>10}")
    print(f"{'lima_jax (KV cache, jit)':28}{th['lima_jax_tokens_per_s']:>10.1f}")
    print(f"{'transformers generate':28}{th['transformers_tokens_per_s']:>10.1f}")
    print(f"speedup vs transformers: {th['speedup']:.2f}x (same tokens: {th['same_tokens']})")
    print(f"{'batch':>6}{'context':>8}{'ms / decoded step':>20}")
    for (b, c), t in per_token.items():
        print(f"{b:>6}{c:>8}{1e3 * t:>20.2f}")
    for b, r in results["per_token_ratio_1024_vs_128"].items():
        print(f"ratio 1024/128 at {b}: {r:.2f} (goal < 1.5)")
    out = ROOT / "benchmarks" / "results" / "decode.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

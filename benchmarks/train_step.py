"""Train-step speed on this machine: the full jitted lima_jax SFT step (forward, backward,
AdamW) against the same step in transformers + PyTorch (eager and torch.compile), in one run.

  python benchmarks/train_step.py [--steps 3] [--warmup 1] [--no-compile] [--jax-default]
                                  [--jax NAME:key=value,key=value ...]

Model "bench-110m": vocab 32000, hidden 768, FFN 2048, 12 layers, 12 heads, sequence 512 x
batch 8 = 4,096 tokens a step, float32, CPU. Both sides start from the same random weights
(a transformers LlamaForCausalLM mapped with lima_jax.convert.layout) and take the same
batch; both do clip-by-global-norm 1.0 + AdamW (b1 0.9, b2 0.95, weight decay 0.1 on all but
the norms), as in the LIMA recipe. The loss is the mean cross-entropy over the 511 next-token
targets of every row (transformers shifts `labels=input_ids`; we pass targets and weights).

Timing: `--warmup` steps (the first one compiles) and then the median of `--steps` timed
steps. The matmul peak is measured in the same run (a 2048^3 float32 jax.numpy matmul, best
of 10). MFU = tokens/s x training FLOPs per token (`lima_jax.model.flops_per_token`: 6 x the
matmul parameters incl. the output head + 12 x layers x dim x seq for attention, counted in
full; remat recomputation not counted) / measured peak.

Variants:
- `lima_jax`: the CPU-tuned model settings in `TUNED` (see docs/benchmarks.md for why).
- `lima_jax-default` (`--jax-default`): the library defaults (layers under scan, remat
  `full`, 4 logits chunks).
- `torch-eager`: LlamaForCausalLM (sdpa attention) + torch.optim.AdamW(fused=True).
- `torch-compile`: the same with the model under `torch.compile` (default mode); its compile
  time is reported apart; skip it with `--no-compile`.
- `--jax NAME:k=v,...`: extra lima_jax variants with model-config overrides (experiments).

Each variant runs in a fresh child process (no memory or compile cache shared with the others);
its peak host memory is the child's peak RSS (frameworks, weights, batch and step included; a
lima_jax child never imports torch).

Sanity: every variant's first-step loss must agree with torch-eager's within 1e-3.
Writes benchmarks/results/train_step.json and ends with `speedup_vs_transformers: X`
(lima_jax tokens/s over the best PyTorch variant's).
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lima_jax.config import base_config  # noqa: E402
from lima_jax.convert.layout import params_from_hf  # noqa: E402
from lima_jax.model import ModelConfig, flops_per_token, param_count  # noqa: E402
from lima_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from lima_jax.train.step import TrainState, make_train_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

BENCH = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, norm_eps=1e-6,
             rope_theta=10000.0, max_seq_len=512, dtype="float32", param_dtype="float32", residual_dropout=0.0)
BATCH, SEQ = 8, 512
# CPU-tuned settings for this benchmark (measured in docs/benchmarks.md, "Train step vs
# PyTorch (CPU)"); the library defaults (scan, remat full) suit TPU pods and deep models.
TUNED = dict(scan_layers=False, remat_policy="none", logits_chunks=4)
LR, WD, CLIP, B1, B2, EPS = 1e-5, 0.1, 1.0, 0.9, 0.95, 1e-8


def model_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**BENCH, **overrides})


def hf_model(cfg: ModelConfig):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0))


def make_batch():
    tokens = np.random.default_rng(0).integers(0, BENCH["vocab_size"], (BATCH, SEQ)).astype(np.int32)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    weights = np.ones(tokens.shape, np.float32)
    weights[:, -1] = 0.0  # the last position has no next token (transformers drops it too)
    return dict(tokens=tokens, targets=targets, positions=np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape).copy(),
                segment_ids=np.ones_like(tokens), loss_weights=weights)


def timed(step, warmup: int, steps: int):
    """(first-step loss, seconds of each warmup step, seconds of each timed step)."""
    first_loss, warm, times = None, [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step()
        (warm if i < warmup else times).append(time.perf_counter() - start)
        if first_loss is None:
            first_loss = loss
    return first_loss, warm, times


def matmul_peak(n=2048, repeats=10) -> float:
    """Best FLOP/s of an n^3 float32 jax.numpy matmul."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run_jax(cfg: ModelConfig, hf_state: dict, batch: dict, warmup: int, steps: int):
    config = base_config()
    config.optimizer.update(learning_rate=LR, end_learning_rate=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                            grad_clip_norm=CLIP)
    optimizer = make_optimizer(config.optimizer, 1000)
    params = jax.tree.map(jnp.asarray, params_from_hf(hf_state, cfg))
    state = TrainState(jnp.int32(0), params, optimizer.init(params))
    step_fn = jax.jit(make_train_step(cfg, optimizer, learning_rate_schedule(config.optimizer, 1000)),
                      donate_argnums=0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.key(0)
    holder = [state]
    del state, params  # the step donates the state: only the holder keeps it

    def step():
        holder[0], metrics = step_fn(holder[0], batch, key)
        return float(metrics["loss"])  # blocks until the step is done

    return timed(step, warmup, steps)


def run_torch(hf_state: dict, batch: dict, warmup: int, steps: int, compile_model: bool):
    import torch

    torch.set_num_threads(os.cpu_count())
    model = hf_model(model_cfg(**TUNED))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in hf_state.items()})
    model.train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(B1, B2), eps=EPS, fused=True)
    forward = torch.compile(model) if compile_model else model
    input_ids = torch.from_numpy(batch["tokens"]).long()

    def step():
        loss = forward(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return timed(step, warmup, steps)


def run_child(spec: dict, data_dir: str, warmup: int, steps: int) -> dict:
    """One variant in this (fresh) process: timings, first loss and the process's peak RSS."""
    hf_state = dict(np.load(os.path.join(data_dir, "weights.npz")))
    batch = dict(np.load(os.path.join(data_dir, "batch.npz")))
    if spec["kind"] == "jax":
        loss, warm, times = run_jax(model_cfg(**spec["overrides"]), hf_state, batch, warmup, steps)
    else:
        loss, warm, times = run_torch(hf_state, batch, warmup, steps, spec["compile"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return dict(first_loss=loss, warmup_times=warm, step_times=times, peak_rss_gib=peak / 2**30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-torch", action="store_true", help="lima_jax variants only (experiments)")
    parser.add_argument("--jax-default", action="store_true", help="also run lima_jax with the library defaults")
    parser.add_argument("--jax", action="append", default=[], metavar="NAME:k=v,...",
                        help="an extra lima_jax variant with model-config overrides")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    parser.add_argument("--child", nargs=2, metavar=("SPEC_JSON", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child[0]), args.child[1], args.warmup, args.steps)))
        return

    load_before = os.getloadavg()
    peak = matmul_peak()
    tuned = model_cfg(**TUNED)
    tokens = BATCH * SEQ
    flops = flops_per_token(tuned, SEQ)
    print(f"matmul peak (jax.numpy 2048^3 float32): {peak / 1e9:.1f} GFLOP/s; "
          f"step = {flops * tokens / 1e12:.3f} TFLOP ({param_count(tuned) / 1e6:.1f}M params)", flush=True)

    specs = [("lima_jax", dict(kind="jax", overrides=TUNED))]
    if args.jax_default:
        specs.append(("lima_jax-default", dict(kind="jax", overrides={})))
    for spec in args.jax:
        name, _, kvs = spec.partition(":")
        overrides = {}
        for kv in filter(None, kvs.split(",")):
            k, v = kv.split("=")
            overrides[k] = {"True": True, "False": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)
        specs.append((name, dict(kind="jax", overrides=overrides)))
    if not args.no_torch:
        specs.append(("torch-eager", dict(kind="torch", compile=False)))
        if not args.no_compile:
            specs.append(("torch-compile", dict(kind="torch", compile=True)))

    runs = []
    with tempfile.TemporaryDirectory() as data_dir:
        hf = hf_model(tuned)
        np.savez(os.path.join(data_dir, "weights.npz"), **{k: v.detach().numpy() for k, v in hf.state_dict().items()})
        np.savez(os.path.join(data_dir, "batch.npz"), **make_batch())
        del hf
        for name, spec in specs:
            print(f"{name}: {spec}", flush=True)
            child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), data_dir,
                                    f"--warmup={args.warmup}", f"--steps={args.steps}"],
                                   capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            if child.returncode:
                raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
            runs.append((name, spec, json.loads(child.stdout.strip().splitlines()[-1])))

    reference_loss = next((r["first_loss"] for n, _, r in runs if n == "torch-eager"), runs[0][2]["first_loss"])
    results = {}
    print("\n| variant | s/step | tokens/s | MFU | first step (incl. compile) s | peak RSS GiB | first loss |")
    print("|---|---|---|---|---|---|---|")
    for name, spec, r in runs:
        s = statistics.median(r["step_times"])
        settings = {k: getattr(model_cfg(**spec["overrides"]), k) for k in ("scan_layers", "remat_policy",
                    "logits_chunks")} if spec["kind"] == "jax" else {}
        results[name] = dict(r, kind=spec["kind"], settings=settings, s_per_step=s, tokens_per_s=tokens / s,
                             mfu=tokens / s * flops / peak, loss_matches_torch=abs(r["first_loss"] - reference_loss) < 1e-3)
        print(f"| {name} | {s:.2f} | {tokens / s:.0f} | {100 * tokens / s * flops / peak:.1f}% | "
              f"{r['warmup_times'][0]:.1f} | {r['peak_rss_gib']:.2f} | {r['first_loss']:.5f} |")
    bad = [n for n, r in results.items() if not r["loss_matches_torch"]]
    if bad:
        print(f"LOSS MISMATCH (> 1e-3 from {reference_loss:.5f}): {bad}")

    torch_best = max((r["tokens_per_s"] for r in results.values() if r["kind"] == "torch"), default=None)
    speedup = results["lima_jax"]["tokens_per_s"] / torch_best if torch_best else None
    import torch
    import transformers

    out = dict(
        model=dict(BENCH, batch=BATCH, seq=SEQ, tuned=TUNED, params=param_count(tuned)),
        flops_per_token=flops, tokens_per_step=tokens, matmul_peak_flops=peak,
        steps=args.steps, warmup=args.warmup, variants=results, speedup_vs_transformers=speedup,
        machine=dict(cpu=platform.machine(), cores=os.cpu_count(), torch_threads=os.cpu_count(),
                     load_before=load_before, load_after=os.getloadavg(), jax=jax.__version__,
                     torch=torch.__version__, transformers=transformers.__version__),
    )
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    if speedup is not None:
        print(f"speedup_vs_transformers: {speedup:.3f}")


if __name__ == "__main__":
    main()

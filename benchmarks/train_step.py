"""Train-step speed on this machine: the full jitted lima_jax SFT step (forward, backward,
AdamW) against the same step in transformers + PyTorch (eager and torch.compile), in one run.

  python benchmarks/train_step.py [--steps 2] [--warmup 1] [--no-compile] [--jax-default]
                                  [--jax NAME:key=value,key=value ...]

Model "bench-110m": vocab 32000, hidden 768, FFN 2048, 12 layers, 12 heads, sequence 512 x
batch 8 = 4,096 tokens a step, float32, CPU. Both sides start from the same random weights
(a transformers LlamaForCausalLM mapped with lima_jax.convert.layout) and take the same
batch; both do clip-by-global-norm 1.0 + AdamW (b1 0.9, b2 0.95, weight decay 0.1 on all but
the norms), as in the LIMA recipe. The loss is the mean cross-entropy over the 511 next-token
targets of every row (transformers shifts `labels=input_ids`; we pass targets and weights).

Timing: every variant runs in its own child process (no memory or compile cache shared) and
takes `--warmup` steps first (the first one compiles). Then the timed steps are interleaved:
lima_jax stays up while each other variant in turn takes `--steps` rounds of one step each
beside it (the order alternating every round), so both sides of a ratio see the same machine.
This machine's speed drifts by 10-20% over minutes (other tenants), which made sequential
timings unreliable. Speedups are ratios of medians within one pairing. The matmul peak is
measured in the same run (a 2048^3 float32 jax.numpy matmul, best of 10). MFU = tokens/s x
training FLOPs per token (`lima_jax.model.flops_per_token`: 6 x the matmul parameters incl.
the output head + 12 x layers x dim x seq for attention, counted in full; remat
recomputation not counted) / measured peak.

Variants:
- `lima_jax`: the CPU-tuned model settings in `TUNED` (see docs/benchmarks.md for why).
- `lima_jax-default` (`--jax-default`): the library defaults (layers under scan, remat
  `full`, 4 logits chunks).
- `torch-eager`: LlamaForCausalLM (sdpa attention) + torch.optim.AdamW(fused=True).
- `torch-compile`: the same with the model under `torch.compile` (default mode); its compile
  time shows in the first step; skip it with `--no-compile`.
- `--jax NAME:k=v,...`: extra lima_jax variants with model-config overrides (experiments).

Peak host memory is each child's peak RSS (framework, weights, batch, compilation and steps
included; a lima_jax child never imports torch).

Sanity: every variant's first-step loss must agree with torch-eager's within 1e-3.
Writes benchmarks/results/train_step.json and ends with `speedup_vs_transformers: X`
(lima_jax's speed over the best PyTorch variant's, each measured beside lima_jax).
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
from lima_jax.train.step import TrainState, compiler_options, make_train_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

BENCH = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, norm_eps=1e-6,
             rope_theta=10000.0, max_seq_len=512, dtype="float32", param_dtype="float32", residual_dropout=0.0)
BATCH, SEQ = 8, 512
# CPU-tuned settings for this benchmark (measured in docs/benchmarks.md, "Train step vs
# PyTorch (CPU)"); the library defaults (scan, remat full) suit TPU pods and deep models.
# Remat `dots` under the memory-optimised scheduler (train.step.compiler_options) runs as
# fast as no remat here with a third less memory.
TUNED = dict(scan_layers=False, remat_policy="dots", logits_chunks=4)
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


def jax_step(cfg: ModelConfig, hf_state: dict, batch: dict):
    """A callable running one lima_jax train step; returns the loss."""
    config = base_config()
    config.optimizer.update(learning_rate=LR, end_learning_rate=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                            grad_clip_norm=CLIP)
    optimizer = make_optimizer(config.optimizer, 1000)
    params = jax.tree.map(jnp.asarray, params_from_hf(hf_state, cfg))
    state = TrainState(jnp.int32(0), params, optimizer.init(params))
    step_fn = jax.jit(make_train_step(cfg, optimizer, learning_rate_schedule(config.optimizer, 1000)),
                      donate_argnums=0, compiler_options=compiler_options())
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.key(0)
    holder = [state]
    del state, params  # the step donates the state: only the holder keeps it

    def step():
        holder[0], metrics = step_fn(holder[0], batch, key)
        return float(metrics["loss"])  # blocks until the step is done

    return step


def torch_step(hf_state: dict, batch: dict, compile_model: bool):
    """A callable running one transformers + PyTorch train step; returns the loss."""
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

    return step


def serve_child(spec: dict, data_dir: str, warmup: int):
    """Child process: build the variant, take the warmup steps, then one timed step per "step"
    line on stdin; "stop" reports the peak RSS. Every reply is one JSON line on stdout."""
    hf_state = dict(np.load(os.path.join(data_dir, "weights.npz")))
    batch = dict(np.load(os.path.join(data_dir, "batch.npz")))
    if spec["kind"] == "jax":
        step = jax_step(model_cfg(**spec["overrides"]), hf_state, batch)
    else:
        step = torch_step(hf_state, batch, spec["compile"])
    del hf_state  # the step holds its own copy of the weights; this one would only add to the peak

    def timed_step():
        start = time.perf_counter()
        loss = step()
        return time.perf_counter() - start, loss

    warm = [timed_step() for _ in range(warmup)]
    print(json.dumps(dict(warmup_times=[t for t, _ in warm], first_loss=warm[0][1])), flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
        print(json.dumps(dict(zip(("time", "loss"), timed_step()))), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps(dict(peak_rss_gib=peak / 2**30)), flush=True)


class Child:
    """A variant's child process, driven step by step."""

    def __init__(self, name: str, spec: dict, data_dir: str, warmup: int):
        print(f"{name}: {spec}", flush=True)
        self.name, self.spec, self.times = name, spec, []
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec), data_dir,
                                      f"--warmup={warmup}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        self.__dict__.update(self._reply())  # warmup_times, first_loss

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name} failed (exit {self.proc.wait()}); its stderr is above")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        t = self._reply()["time"]
        self.times.append(t)
        return t

    def stop(self):
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.peak_rss_gib = self._reply()["peak_rss_gib"]
        self.proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed rounds beside each other variant")
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
        serve_child(json.loads(args.child[0]), args.child[1], args.warmup)
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

    pairings = []  # (other variant, lima_jax step times taken beside it)
    with tempfile.TemporaryDirectory() as data_dir:
        hf = hf_model(tuned)
        np.savez(os.path.join(data_dir, "weights.npz"), **{k: v.detach().numpy() for k, v in hf.state_dict().items()})
        np.savez(os.path.join(data_dir, "batch.npz"), **make_batch())
        del hf
        main_child = Child(*specs[0], data_dir, args.warmup)
        for name, spec in specs[1:]:
            other, beside = Child(name, spec, data_dir, args.warmup), []
            for i in range(args.steps):
                pair = (main_child, other) if i % 2 == 0 else (other, main_child)
                for child in pair:
                    t = child.step()
                    if child is main_child:
                        beside.append(t)
            other.stop()
            pairings.append((other, beside))
        if not pairings:  # nothing to pair with: time lima_jax alone
            pairings.append((None, [main_child.step() for _ in range(args.steps)]))
        main_child.stop()

    children = [main_child] + [c for c, _ in pairings if c is not None]
    reference_loss = next((c.first_loss for c in children if c.name == "torch-eager"), main_child.first_loss)
    results = {}
    print("\n| variant | s/step | tokens/s | MFU | speed vs lima_jax beside it | first step (incl. compile) s | "
          "peak RSS GiB | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for c in children:
        s = statistics.median(c.times)
        beside = next((b for o, b in pairings if o is c), None)
        relative = statistics.median(beside) / s if beside else 1.0  # > 1: faster than lima_jax
        settings = {k: getattr(model_cfg(**c.spec["overrides"]), k) for k in ("scan_layers", "remat_policy",
                    "logits_chunks")} if c.spec["kind"] == "jax" else {}
        results[c.name] = dict(kind=c.spec["kind"], settings=settings, s_per_step=s, step_times=c.times,
                               lima_jax_times_beside=beside, speed_vs_lima_jax=relative, warmup_times=c.warmup_times,
                               tokens_per_s=tokens / s, mfu=tokens / s * flops / peak, peak_rss_gib=c.peak_rss_gib,
                               first_loss=c.first_loss, loss_matches_torch=abs(c.first_loss - reference_loss) < 1e-3)
        print(f"| {c.name} | {s:.2f} | {tokens / s:.0f} | {100 * tokens / s * flops / peak:.1f}% | {relative:.3f} | "
              f"{c.warmup_times[0]:.1f} | {c.peak_rss_gib:.2f} | {c.first_loss:.5f} |")
    bad = [n for n, r in results.items() if not r["loss_matches_torch"]]
    if bad:
        print(f"LOSS MISMATCH (> 1e-3 from {reference_loss:.5f}): {bad}")

    # Against the best PyTorch variant, each measured beside lima_jax.
    torch_best = max((r["speed_vs_lima_jax"] for r in results.values() if r["kind"] == "torch"), default=None)
    speedup = 1.0 / torch_best if torch_best else None
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

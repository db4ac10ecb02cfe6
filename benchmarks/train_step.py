"""Train-step speed on this machine: the full jitted lima_jax SFT step (forward, backward,
AdamW) against the same step in transformers + PyTorch (eager and torch.compile), in one run.

  python benchmarks/train_step.py [--steps 2] [--warmup 1] [--no-compile] [--jax-default]
                                  [--jax NAME:key=value,key=value ...] [--platform gpu]
                                  [--model bench-110m|llama3.2-1b|llama3.2-1b-tiny] [--bf16 | --bf16-only]

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
- `lima_jax`: the CPU-tuned settings in `TUNED` (model settings and micro-batches; see
  docs/benchmarks.md for why),
  `GPU_TUNED` on a GPU; `lima_jax-bf16` (`--bf16`, GPU): those in bfloat16 with cuDNN attention.
- `lima_jax-default` (`--jax-default`): the library defaults (layers under scan, remat
  `full`, 4 logits chunks).
- `torch-eager`: LlamaForCausalLM (sdpa attention) + torch.optim.AdamW(fused=True).
- `torch-compile`: the same with the model under `torch.compile` (default mode); its compile
  time shows in the first step; skip it with `--no-compile`.
- `torch-compile-mb4` (CPU): torch.compile over 4 micro-batches of 2 rows, one update, as the
  tuned lima_jax step takes them: like for like in memory too.
- `--jax NAME:k=v,...`: extra lima_jax variants with model-config overrides (experiments).

Peak host memory is each child's peak RSS (framework, weights, batch, compilation and steps
included; a lima_jax child never imports torch).

GPU (`--platform gpu`): the same model and batch on the first CUDA device. Float32 matmuls
run as TF32 on both sides (JAX's default there; PyTorch is set to match with
`torch.set_float32_matmul_precision("high")`), `--bf16` adds bfloat16 variants (lima_jax
`dtype=bfloat16` with float32 parameters, cuDNN attention; PyTorch autocast). A timed step is
`--inner` steps (default 20) over one device sync, since one step takes milliseconds. MFU is
counted against the card's published dense peak (BF16 from `train.metrics.PEAK_FLOPS`, TF32
half of it); memory is each child's peak device memory.

Sanity: every variant's first-step loss must agree with torch-eager's of its dtype within 1e-3 (float32
on CPU; 2e-2 with TF32; bfloat16: 0.5% of the loss).

`--model llama3.2-1b` (benchmarks/gpu_1b.sh): Llama 3.2 1B's shapes (tied embeddings, GQA,
llama3 RoPE) on 8 rows of 2,048 tokens, a real run's step on one GPU; `llama3.2-1b-tiny` is
the same family at toy sizes for CPU tests.
Writes benchmarks/results/train_step.json (train_step_gpu.json on a GPU; a `_MODEL` suffix
for other models) and ends with
`speedup_vs_transformers: X` (lima_jax's speed over the best PyTorch variant's, each
measured beside lima_jax; on a GPU with `--bf16`, also `speedup_vs_transformers_bf16`).
"""

import argparse
import dataclasses
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

from lima_jax.backend import compile_step  # noqa: E402
from lima_jax.config import base_config, run_config  # noqa: E402
from lima_jax.convert.hf_config import write_hf_config  # noqa: E402
from lima_jax.convert.layout import params_from_hf  # noqa: E402
from lima_jax.model import ModelConfig, flops_per_token, param_count  # noqa: E402
from lima_jax.sharding import make_mesh  # noqa: E402
from lima_jax.train.metrics import peak_flops_per_device  # noqa: E402
from lima_jax.train.program import build_program  # noqa: E402
from lima_jax.train.step import TrainState  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

BENCH = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, norm_eps=1e-6,
             rope_theta=10000.0, max_seq_len=512, dtype="float32", param_dtype="float32", residual_dropout=0.0)
# Llama 3.2 1B's shapes (configs/llama3_1b.py: tied embeddings, grouped-query attention, llama3
# RoPE scaling) on 2,048-token rows: a real run's step shape for a GPU, where bench-110m is too
# small to say anything. "llama3.2-1b-tiny" is the same family at toy sizes, so CI exercises the
# path (tests/test_benchmarks.py) and GPU time goes to measuring, not debugging.
LLAMA32_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, norm_eps=1e-5,
                  rope_theta=500000.0, max_seq_len=2048, tied_embeddings=True, rope_type="llama3", rope_factor=32.0,
                  rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
                  dtype="float32", param_dtype="float32", residual_dropout=0.0)
MODELS = {  # name -> (model config, rows a step, tokens a row)
    "bench-110m": (BENCH, 8, 512),
    "llama3.2-1b": (LLAMA32_1B, 8, 2048),
    "llama3.2-1b-tiny": (dict(LLAMA32_1B, vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                              max_seq_len=64, rope_original_max_len=32), 4, 64),
}
# Toy sizes get larger random weights: at transformers' 0.02 the logits are near uniform and the
# first loss is ln(vocab) whatever the RoPE or the output head, so the loss check could not fail.
INIT_STD = {"llama3.2-1b-tiny": 0.5}
# CPU-tuned settings for this benchmark (measured in docs/benchmarks.md, "Train step vs
# PyTorch (CPU)"); the library defaults (scan, remat full) suit TPU pods and deep models.
# `grad_accum_steps` is the train step's: the 8 rows go through forward and backward as 4
# micro-batches of 2 (one optimizer update, the same gradients). Each micro-batch's
# activations are a quarter the size, so no remat and one logits chunk fit in less memory
# than remat `dots` over the whole batch did, and XLA:CPU's per-step temporaries (fresh
# pages from the kernel every step) shrink with them: 12% faster, at 4.3 instead of 6.2 GiB.
# `transposed_wgrad`: weight gradients from a transposed copy of their input, the operand
# order XLA:CPU's fast matmul library takes (lima_jax/model/dense.py).
TUNED = dict(scan_layers=False, remat_policy="none", logits_chunks=1, transposed_wgrad=True, grad_accum_steps=4)
# On a GPU this model is small: nothing to save memory for, so no remat and one logits chunk.
GPU_TUNED = dict(scan_layers=False, remat_policy="none", logits_chunks=1)
BF16 = dict(dtype="bfloat16", attention="cudnn")
# NVIDIA's tensor cores (Ampere, Hopper) run TF32 at half their dense bfloat16 rate.
TF32_SHARE_OF_BF16_PEAK = 0.5
# Every child (both frameworks) asks glibc for transparent huge pages on its large allocations:
# a step's temporaries are fresh mappings each step, touched in 4 KiB pages otherwise (550,000
# page faults a lima_jax step; docs/benchmarks.md). Read by glibc at process start only; the
# caller's own tunables are kept.
HUGE_PAGES = "glibc.malloc.hugetlb=1"
LR, WD, CLIP, B1, B2, EPS = 1e-5, 0.1, 1.0, 0.9, 0.95, 1e-8


def model_cfg(model: str, grad_accum_steps: int = 1, **overrides) -> ModelConfig:
    """A bench model (MODELS) with `overrides`; `grad_accum_steps` belongs to the train step and
    is accepted (and ignored) here so that one settings dict describes a variant."""
    return ModelConfig(**{**MODELS[model][0], **overrides})


def hf_model(model: str, cfg: ModelConfig):
    import torch
    import transformers

    torch.manual_seed(0)
    config = dict(write_hf_config(cfg, "float32", eot_id=None), initializer_range=INIT_STD.get(model, 0.02))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))


def make_batch(model: str):
    config, rows, seq = MODELS[model]
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], (rows, seq)).astype(np.int32)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    weights = np.ones(tokens.shape, np.float32)
    weights[:, -1] = 0.0  # the last position has no next token (transformers drops it too)
    return dict(tokens=tokens, targets=targets, positions=np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape).copy(),
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


def jax_step(model: str, settings: dict, hf_state: dict, batch: dict):
    """A callable running one lima_jax train step with a variant's settings (model overrides
    and `grad_accum_steps`); returns the loss (not waited for)."""
    cfg = model_cfg(model, **settings)
    config = base_config()
    config.optimizer.update(learning_rate=LR, end_learning_rate=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                            grad_clip_norm=CLIP)
    config.train.grad_accum_steps = settings.get("grad_accum_steps", 1)
    program = build_program(dataclasses.replace(run_config(config), model=cfg), make_mesh(config.mesh, jax.devices()[:1]),
                            total_steps=1000)
    params = jax.tree.map(jnp.asarray, params_from_hf(hf_state, cfg))
    state = TrainState(jnp.int32(0), params, program.optimizer.init(params))
    step_fn = program.train_step
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.key(0)
    holder, compiled = [state], []
    del state, params  # the step donates the state: only the holder keeps it

    def step():
        if not compiled:  # the first step compiles, as the train loop does
            compiled.append(compile_step(step_fn, holder[0], batch, key))
        holder[0], metrics = compiled[0](holder[0], batch, key)
        return metrics["loss"]  # float() on it waits for the whole step: one program, one completion

    return step


def torch_step(model_name: str, hf_state: dict, batch: dict, compile_model: bool, bf16: bool = False,
               micro_batches: int = 1):
    """A callable running one transformers + PyTorch train step; returns the loss (a tensor).
    `micro_batches`: forward and backward over that many slices of the rows, one update (as
    lima_jax's `grad_accum_steps`): like for like in memory with the tuned lima_jax step."""
    import contextlib

    import torch

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as JAX does by default; no-op on CPU
    model = hf_model(model_name, model_cfg(model_name))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in hf_state.items()})
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(B1, B2), eps=EPS, fused=True)
    forward = torch.compile(model) if compile_model else model
    input_ids = torch.from_numpy(batch["tokens"]).long().to(device)
    precision = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        # Every row has the same number of targets, so the mean over micro-batch means is the batch's mean.
        loss = 0.0
        for ids in input_ids.chunk(micro_batches):
            with precision:
                part = forward(input_ids=ids, labels=ids).loss / micro_batches
            part.backward()
            loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def serve_child(spec: dict, data_dir: str, warmup: int, inner: int):
    """Child process: build the variant, take the warmup steps, then one timed round of
    `inner` steps per "step" line on stdin; "stop" reports the peak memory. Every reply is
    one JSON line on stdout."""
    hf_state = dict(np.load(os.path.join(data_dir, "weights.npz")))
    batch = dict(np.load(os.path.join(data_dir, "batch.npz")))
    if spec["kind"] == "jax":
        step = jax_step(spec["model"], spec["overrides"], hf_state, batch)
        device = jax.devices()[0]
        sync, device_peak = lambda: None, lambda: (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    else:
        import torch

        step = torch_step(spec["model"], hf_state, batch, spec["compile"], spec.get("bf16", False),
                          spec.get("micro_batches", 1))
        on_gpu = torch.cuda.is_available()
        device = torch.cuda.get_device_name() if on_gpu else "cpu"
        sync = torch.cuda.synchronize if on_gpu else lambda: None
        device_peak = torch.cuda.max_memory_allocated if on_gpu else lambda: 0
    del hf_state  # the step holds its own copy of the weights; this one would only add to the peak

    def timed_round(n):
        """Seconds per step over n steps, and the last step's loss."""
        start = time.perf_counter()
        for _ in range(n):
            loss = step()
        loss = float(loss)
        sync()  # PyTorch: the optimizer update after the loss too
        return (time.perf_counter() - start) / n, loss

    warm = [timed_round(1) for _ in range(warmup)]
    print(json.dumps(dict(warmup_times=[t for t, _ in warm], first_loss=warm[0][1],
                          device=getattr(device, "device_kind", str(device)),
                          bf16_peak=peak_flops_per_device(device) if spec["kind"] == "jax" else None)), flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
        print(json.dumps(dict(zip(("time", "loss"), timed_round(inner)))), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps(dict(peak_rss_gib=peak / 2**30, device_peak_gib=device_peak() / 2**30)), flush=True)


class ChildFailed(RuntimeError):
    pass


class Child:
    """A variant's child process, driven step by step."""

    def __init__(self, name: str, spec: dict, data_dir: str, args):
        print(f"{name}: {spec}", flush=True)
        self.name, self.spec, self.times = name, spec, []
        # On a GPU every child allocates as it goes (no preallocation), so one's peak is its own.
        env = dict(os.environ, JAX_PLATFORMS="cuda" if args.platform == "gpu" else "cpu",
                   XLA_PYTHON_CLIENT_PREALLOCATE="false",
                   GLIBC_TUNABLES=":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), HUGE_PAGES))))
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec), data_dir,
                                      f"--warmup={args.warmup}", f"--inner={args.inner}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.__dict__.update(self._reply())  # warmup_times, first_loss, device

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise ChildFailed(f"{self.name} failed (exit {self.proc.wait()}); its stderr is above")
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
        self.__dict__.update(self._reply())  # peak_rss_gib, device_peak_gib
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
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--inner", type=int, help="steps per timed round (default 1 on CPU, 20 on GPU)")
    parser.add_argument("--bf16", action="store_true", help="also bfloat16 variants of both sides")
    parser.add_argument("--bf16-only", action="store_true", help="only the bfloat16 variants (lima_jax-bf16 leads)")
    parser.add_argument("--model", choices=tuple(MODELS), default="bench-110m")
    parser.add_argument("--output", help="default benchmarks/results/train_step[_gpu].json")
    parser.add_argument("--child", nargs=2, metavar=("SPEC_JSON", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.platform == "gpu"
    args.inner = args.inner or (20 if gpu else 1)
    if args.child:
        serve_child(json.loads(args.child[0]), args.child[1], args.warmup, args.inner)
        return

    load_before = os.getloadavg()
    tuned_settings = GPU_TUNED if gpu else TUNED
    tuned = model_cfg(args.model, **tuned_settings)
    _, rows, seq = MODELS[args.model]
    tokens = rows * seq
    flops = flops_per_token(tuned, seq)
    peak = None if gpu else matmul_peak()  # on a GPU: the card's published peak, once a child names the card
    print(f"step = {flops * tokens / 1e12:.3f} TFLOP ({param_count(tuned) / 1e6:.1f}M params)"
          + (f"; matmul peak (jax.numpy 2048^3 float32): {peak / 1e9:.1f} GFLOP/s" if peak else ""), flush=True)

    # The cuDNN kernel needs a GPU; the CPU's bfloat16 variants (tests) take XLA's attention.
    bf16_settings = {**tuned_settings, **BF16, **({} if gpu else dict(attention="xla"))}
    micro_batches = tuned_settings.get("grad_accum_steps", 1)
    specs = []  # the first one is the lima_jax child every other variant runs beside
    for dtype in ("bfloat16",) if args.bf16_only else ("float32", "bfloat16") if args.bf16 else ("float32",):
        suffix = "-bf16" if dtype == "bfloat16" else ""
        specs.append((f"lima_jax{suffix}", dict(kind="jax", overrides=bf16_settings if suffix else tuned_settings)))
        if args.no_torch:
            continue
        torch_spec = dict(kind="torch", compile=False, bf16=bool(suffix))
        specs.append((f"torch-eager{suffix}", torch_spec))
        if not args.no_compile:
            specs.append((f"torch-compile{suffix}", dict(torch_spec, compile=True)))
            if micro_batches > 1:  # like for like with lima_jax's micro-batches, in memory too
                specs.append((f"torch-compile-mb{micro_batches}{suffix}",
                              dict(torch_spec, compile=True, micro_batches=micro_batches)))
    if args.jax_default:
        specs.insert(1, ("lima_jax-default", dict(kind="jax", overrides={})))
    for spec in args.jax:
        name, _, kvs = spec.partition(":")
        overrides = {}
        for kv in filter(None, kvs.split(",")):
            k, v = kv.split("=")
            overrides[k] = {"True": True, "False": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)
        specs.append((name, dict(kind="jax", overrides=overrides)))
    specs = [(name, dict(spec, model=args.model)) for name, spec in specs]
    pairings = []  # (other variant, lima_jax step times taken beside it)
    with tempfile.TemporaryDirectory() as data_dir:
        hf = hf_model(args.model, tuned)
        np.savez(os.path.join(data_dir, "weights.npz"), **{k: v.detach().numpy() for k, v in hf.state_dict().items()})
        np.savez(os.path.join(data_dir, "batch.npz"), **make_batch(args.model))
        del hf
        main_child = Child(*specs[0], data_dir, args)
        for name, spec in specs[1:]:
            try:
                other, beside = Child(name, spec, data_dir, args), []
            except ChildFailed as e:  # e.g. torch.compile on a new stack: report the others
                print(f"SKIPPED {e}", flush=True)
                continue
            for i in range(args.steps):
                pair = (main_child, other) if i % 2 == 0 else (other, main_child)
                for child in pair:
                    t = child.step()
                    if child is main_child:
                        beside.append(t)
            other.stop()
            pairings.append((other, beside))
            print(f"{name}: {statistics.median(other.times):.4g} s/step, lima_jax beside it "
                  f"{statistics.median(beside):.4g}", flush=True)
        if not pairings:  # nothing to pair with: time lima_jax alone
            pairings.append((None, [main_child.step() for _ in range(args.steps)]))
        main_child.stop()

    children = [main_child] + [c for c, _ in pairings if c is not None]
    first_losses = {c.name: c.first_loss for c in children}
    card = main_child.device if gpu else None
    results = {}
    memory = "device peak GiB" if gpu else "peak RSS GiB"
    print(f"\n| variant | s/step | tokens/s | MFU | speed vs lima_jax beside it | first step (incl. compile) s | "
          f"{memory} | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for c in children:
        s = statistics.median(c.times)
        beside = next((b for o, b in pairings if o is c), None)
        relative = statistics.median(beside) / s if beside else 1.0  # > 1: faster than lima_jax
        jax_cfg = model_cfg(args.model, **c.spec["overrides"]) if c.spec["kind"] == "jax" else None
        settings = {}
        if jax_cfg:  # the model settings in effect, defaults included, and the micro-batches
            settings = {k: getattr(jax_cfg, k) for k in ("scan_layers", "remat_policy", "logits_chunks", "transposed_wgrad",
                                                    "dtype", "attention")}
            settings["grad_accum_steps"] = c.spec["overrides"].get("grad_accum_steps", 1)
        dtype = jax_cfg.dtype if jax_cfg else ("bfloat16" if c.spec.get("bf16") else "float32")
        variant_peak = peak
        if gpu and main_child.bf16_peak:
            variant_peak = main_child.bf16_peak * (1.0 if dtype == "bfloat16" else TF32_SHARE_OF_BF16_PEAK)
        mfu = tokens / s * flops / variant_peak if variant_peak else None
        # Against the same dtype's PyTorch eager loss: float32 on a CPU agrees to 1e-3, TF32 to 2e-2;
        # bfloat16 to 0.5% of the loss (the two sides round different ops; a wrong RoPE moves it 1.3%).
        suffix = "-bf16" if dtype == "bfloat16" else ""
        reference_loss = first_losses.get(f"torch-eager{suffix}", main_child.first_loss)
        tolerance = max(2e-2, 5e-3 * abs(reference_loss)) if suffix else 2e-2 if gpu else 1e-3
        results[c.name] = dict(kind=c.spec["kind"], dtype=dtype, settings=settings, s_per_step=s, step_times=c.times,
                               lima_jax_times_beside=beside, speed_vs_lima_jax=relative, warmup_times=c.warmup_times,
                               tokens_per_s=tokens / s, mfu=mfu, peak_flops=variant_peak, peak_rss_gib=c.peak_rss_gib,
                               device_peak_gib=c.device_peak_gib, first_loss=c.first_loss,
                               reference_loss=reference_loss,
                               loss_matches_torch=abs(c.first_loss - reference_loss) < tolerance)
        print(f"| {c.name} | {s:.4g} | {tokens / s:.0f} | {f'{100 * mfu:.1f}%' if mfu else '-'} | {relative:.3f} | "
              f"{c.warmup_times[0]:.1f} | {c.device_peak_gib if gpu else c.peak_rss_gib:.2f} | {c.first_loss:.5f} |")
    bad = {n: (r["first_loss"], r["reference_loss"]) for n, r in results.items() if not r["loss_matches_torch"]}
    if bad:
        print(f"LOSS MISMATCH (first loss, PyTorch eager's): {bad}")

    def speedup(name, dtype):
        """lima_jax variant `name` over the fastest PyTorch variant of the same dtype; every
        speed is relative to the lima_jax child it ran beside, so this is a ratio of those."""
        torch_best = max((r["speed_vs_lima_jax"] for r in results.values() if r["kind"] == "torch"
                          and r["dtype"] == dtype), default=None)
        return results[name]["speed_vs_lima_jax"] / torch_best if name in results and torch_best else None

    speedups = {"float32": speedup("lima_jax", "float32"), "bfloat16": speedup("lima_jax-bf16", "bfloat16")}
    import torch
    import transformers

    out = dict(
        model=dict(MODELS[args.model][0], name=args.model, batch=rows, seq=seq, tuned=tuned_settings,
                   params=param_count(tuned)),
        flops_per_token=flops, tokens_per_step=tokens, matmul_peak_flops=peak, device=card or "cpu",
        steps=args.steps, inner_steps=args.inner, warmup=args.warmup, variants=results,
        speedup_vs_transformers=speedups["float32"], speedup_vs_transformers_bf16=speedups["bfloat16"],
        machine=dict(cpu=platform.machine(), cores=os.cpu_count(), torch_threads=os.cpu_count(),
                     load_before=load_before, load_after=os.getloadavg(), jax=jax.__version__,
                     torch=torch.__version__, transformers=transformers.__version__),
    )
    name = f"train_step{'_gpu' if gpu else ''}{'' if args.model == 'bench-110m' else '_' + args.model}.json"
    path = pathlib.Path(args.output or ROOT / "benchmarks" / "results" / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    if speedups["bfloat16"] is not None:
        print(f"speedup_vs_transformers_bf16: {speedups['bfloat16']:.3f}")
    if speedups["float32"] is not None:
        print(f"speedup_vs_transformers: {speedups['float32']:.3f}")


if __name__ == "__main__":
    main()

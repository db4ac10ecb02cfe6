"""Conversion throughput and peak host memory against model depth (same width, more layers).

For each depth a random Meta-format release (params.json + 2 model-parallel `.pth` shards,
float32) is written to a scratch folder, then converted to Orbax and exported back to HF,
each in a fresh subprocess that warms up on a tiny model (JAX, Orbax, tensorstore, torch all
initialised), resets the kernel's high-water mark and reports its peak RSS (VmHWM) over that
baseline. The converter streams one layer's tensor at a time, so the peak over baseline
should be flat in depth: a small multiple of the largest single tensor (one layer's w1, or
the embedding) and far below the largest stacked group ([layers, ...]) at depth.

    python benchmarks/convert.py [--layers 4 16 32] [--dim 1024] [--scratch /tmp/convert_bench]

Writes benchmarks/results/convert.json and prints a table.
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPORT_SHARD_BYTES = 100 << 20  # the exporter holds one pending safetensors shard (HF's default: 5 GB)
sys.path.insert(0, str(ROOT))


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args):
    """One conversion (or export) in this process; prints one JSON line."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import torch  # noqa: F401
    from safetensors import safe_open  # noqa: F401

    from lima_jax.convert import convert_to_orbax, export_hf  # noqa: F401  (imports are the overhead)

    # Warm up on a tiny model first (JAX backend, Orbax, tensorstore, torch.load all initialised),
    # so the fixed overhead is in the baseline and the peak above it is the conversion's own.
    tiny = pathlib.Path(args.output + ".warmup")
    shutil.rmtree(tiny, ignore_errors=True)
    write_meta(tiny / "meta", 64, 1, 2, 256)
    convert_to_orbax("meta", tiny / "meta", tiny / "ckpt", overwrite=True)
    export_hf(tiny / "ckpt", tiny / "hf", overwrite=True)
    shutil.rmtree(tiny)

    base = status_mb("VmRSS")
    exact = reset_peak_rss()
    start = time.perf_counter()
    if args.child == "to_orbax":
        report = convert_to_orbax("meta", args.input, args.output, overwrite=True)
        nbytes = report["bytes_read"]
    else:
        report = export_hf(args.input, args.output, overwrite=True, max_shard_bytes=EXPORT_SHARD_BYTES)
        nbytes = report["bytes_written"]
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "baseline_rss_mb": base, "peak_rss_mb": peak,
                      "peak_reset": exact}))


def write_meta(directory: pathlib.Path, dim, n_layers, n_heads, vocab, shards=2, seed=0):
    import numpy as np
    import torch

    from lima_jax.convert.layout import ffn_dim_meta, layout
    from lima_jax.model import ModelConfig

    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                      ffn_dim=ffn_dim_meta(dim, 256))
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = [{} for _ in range(shards)]
    for t in layout(cfg):
        for i in (range(n_layers) if t.per_layer else [None]):
            w = torch.from_numpy(rng.standard_normal(t.hf_shape(cfg), dtype=np.float32) * 0.02)
            pieces = [w] * shards if t.meta_split_dim is None else torch.chunk(w, shards, dim=t.meta_split_dim)
            for part, piece in zip(parts, pieces):
                part[t.meta_name(i)] = piece.clone()
    for k, part in enumerate(parts):
        torch.save(part, directory / f"consolidated.{k:02d}.pth")
    (directory / "params.json").write_text(json.dumps(
        {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "norm_eps": 1e-5, "vocab_size": vocab, "multiple_of": 256}))
    sizes = {}  # name -> (bytes of one tensor as HF stores it, bytes of the whole group); float32
    for t in layout(cfg):
        n = 4
        for s in t.hf_shape(cfg):
            n *= s
        sizes[".".join(t.path)] = (n, n * (n_layers if t.per_layer else 1))
    # ours pads the vocabulary to 128 rows; negligible here
    return cfg, sizes


def run_child(mode, src, dst):
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--input", str(src), "--output", str(dst)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    # 4000, not 32000: keeps the proportions of the real model. At 65B the embedding (32000 x 8192,
    # 1.05 GB) is 1.45x one layer's w1 (8192 x 22016, 0.72 GB); here 4000 x 1024 is 1.42x one
    # layer's w1 (1024 x 2816), where a 32k vocabulary would make the embedding 11x it.
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--scratch", default="/tmp/lima_convert_bench")
    p.add_argument("--child", choices=["to_orbax", "to_hf"])
    p.add_argument("--input")
    p.add_argument("--output")
    args = p.parse_args()
    if args.child:
        return child(args)

    scratch = pathlib.Path(args.scratch)
    rows = []
    for n_layers in args.layers:
        shutil.rmtree(scratch, ignore_errors=True)
        cfg, sizes = write_meta(scratch / "meta", args.dim, n_layers, args.heads, args.vocab)
        total = sum(g for _, g in sizes.values())
        stacked = {k: v for k, v in sizes.items() if k.startswith("layers.")}
        group = max(sizes, key=lambda k: sizes[k][1])
        layer = max(stacked, key=lambda k: stacked[k][0])
        single = max(sizes, key=lambda k: sizes[k][0])
        row = {"n_layers": n_layers, "dim": args.dim, "ffn_dim": cfg.ffn_dim, "vocab": args.vocab,
               "model_mb": total / 1e6,
               "largest_group": group, "largest_group_mb": sizes[group][1] / 1e6,
               "largest_layer_tensor": layer, "largest_layer_tensor_mb": stacked[layer][0] / 1e6,
               "largest_tensor": single, "largest_tensor_mb": sizes[single][0] / 1e6}
        for mode, src, dst in (("to_orbax", scratch / "meta", scratch / "ckpt"), ("to_hf", scratch / "ckpt", scratch / "hf")):
            r = run_child(mode, src, dst)
            over = r["peak_rss_mb"] - r["baseline_rss_mb"]
            row[mode] = {**r, "mb_per_s": r["bytes"] / 1e6 / r["seconds"], "peak_over_baseline_mb": over,
                         "peak_over_baseline_per_layer_tensor": over / row["largest_layer_tensor_mb"],
                         "peak_over_baseline_per_largest_tensor": over / row["largest_tensor_mb"],
                         "peak_over_baseline_per_largest_group": over / row["largest_group_mb"]}
        rows.append(row)
    shutil.rmtree(scratch, ignore_errors=True)

    result = {"benchmark": "convert", "source": "meta, 2 shards, float32", "cpus": os.cpu_count(),
              "export_shard_bytes": EXPORT_SHARD_BYTES, "rows": rows}
    out = ROOT / "benchmarks" / "results" / "convert.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    r0 = rows[0]
    print(f"width {args.dim}, ffn {r0['ffn_dim']}, vocab {args.vocab}; largest layer tensor "
          f"{r0['largest_layer_tensor']} {r0['largest_layer_tensor_mb']:.1f} MB, largest single tensor "
          f"{r0['largest_tensor']} {r0['largest_tensor_mb']:.1f} MB; peak = RSS high-water mark over the warm baseline")
    head = (f"{'layers':>6} {'model MB':>9} {'group MB':>8} | {'->orbax MB/s':>12} {'peak MB':>7} {'x layer':>7} "
            f"{'x tensor':>8} {'x group':>7} | {'->hf MB/s':>9} {'peak MB':>7} {'x layer':>7} {'x tensor':>8} {'x group':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [f"{r['n_layers']:>6} {r['model_mb']:>9.0f} {r['largest_group_mb']:>8.0f}"]
        for mode, w in (("to_orbax", 12), ("to_hf", 9)):
            m = r[mode]
            cells.append(f"{m['mb_per_s']:>{w}.1f} {m['peak_over_baseline_mb']:>7.0f} "
                         f"{m['peak_over_baseline_per_layer_tensor']:>7.2f} {m['peak_over_baseline_per_largest_tensor']:>8.2f} "
                         f"{m['peak_over_baseline_per_largest_group']:>7.2f}")
        print(" | ".join(cells))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

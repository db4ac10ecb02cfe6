"""sample.py --prompts before and after continuous batching: the same answers file, in less time.

  python benchmarks/answer_file.py [--prompts 48 --slots 8 --max_new_tokens 160]

48 prompts of mixed lengths (LIMA's test.jsonl from ../shared when present, else the demo
data), the tiny config (configs/tiny.py) with random weights whose EOT column is scaled up a
little, so that answers end at varied lengths (about half at max_new_tokens), answered greedy
and seeded (LIMA's sampling) by `answer_file`: once by today's code (main at BASELINE, batched
generation: each batch waits for its longest answer; run from a `git archive` of that commit
in a subprocess) and once by this tree's (continuous batching: a finished row takes the next
prompt). Both processes get the same weights (an .npz by
parameter path), the same prompts file and the same flags. The answers files must be equal
byte for byte; each side's wall and CPU seconds are printed, cold (the first file,
compilation included) and warm (the same file again in the same process), with the ratios
old / new. Writes benchmarks/results/answer_file.json.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASELINE = "dc9950a"  # main before the one decoder: generate.py's batched prefill + decode loop
EOT_SCALE = 1.2  # EOT's output column x this: greedy answers end anywhere from 0 to max_new_tokens


def prompts_file(path: pathlib.Path, count: int, tokenizer, longest: int) -> list[int]:
    """`count` single-turn prompts of at most `longest` tokens; returns their token counts."""
    shared = ROOT.parent / "shared" / "lima" / "test.jsonl"
    source = shared if shared.exists() else ROOT / "lima_jax" / "data" / "demo" / "train.jsonl"
    chosen, lengths = [], []
    for line in source.read_text().splitlines():
        turn = json.loads(line)["conversations"][0]
        n = len(tokenizer.encode(turn)) + 2  # BOS and EOT
        if n <= longest:
            chosen.append(json.dumps({"conversations": [turn]}))
            lengths.append(n)
        if len(chosen) == count:
            break
    path.write_text("".join(c + "\n" for c in chosen))
    return lengths


def save_params(path: pathlib.Path, seed: int) -> None:
    """Random tiny weights with EOT's output column scaled (EOT_SCALE), by parameter path."""
    import jax
    import numpy as np

    from lima_jax.config import model_config
    from lima_jax.model import init_params
    sys.path.insert(0, str(ROOT))
    from configs.tiny import get_config

    cfg = model_config(get_config())
    params = jax.device_get(init_params(cfg, jax.random.key(seed)))
    flat = {jax.tree_util.keystr(k): np.array(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat[next(k for k in flat if "lm_head" in k)][:, cfg.vocab_size - 1] *= EOT_SCALE  # [dim, vocab]; EOT is last
    np.savez(path, **flat)


def worker(args) -> None:
    """Answer the prompts file greedy and seeded with the `lima_jax` on sys.path; print the times."""
    import jax
    import numpy as np

    from lima_jax.config import model_config
    from lima_jax.data.tokenizer import load_tokenizer
    from lima_jax.model import abstract_params
    from lima_jax.sampling import SamplingSettings
    from lima_jax.sampling.sampler import Sampler, answer_file
    sys.path.insert(0, str(pathlib.Path(args.tree)))
    from configs.tiny import get_config

    cfg = model_config(get_config())
    stored = np.load(args.params)
    paths, tree = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
    params = jax.tree_util.tree_unflatten(tree, [jax.numpy.asarray(stored[jax.tree_util.keystr(k)]) for k, _ in paths])
    sampler = Sampler(cfg, params, load_tokenizer(""))
    times = {}
    for mode, settings in (("greedy", SamplingSettings(greedy=True, max_new_tokens=args.max_new_tokens)),
                           ("seeded", SamplingSettings(max_new_tokens=args.max_new_tokens))):
        for run in ("cold", "warm"):
            out = pathlib.Path(args.out) / f"{mode}_{run}.jsonl"
            wall, cpu = time.perf_counter(), time.process_time()
            summary = answer_file(sampler, args.prompts_path, str(out), settings, args.slots, seed=3, progress=False)
            times[f"{mode}_{run}"] = dict(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu,
                                          answer_tokens=summary["answer_tokens"])
    print("TIMES " + json.dumps(times))


def run_worker(tree: pathlib.Path, out: pathlib.Path, args, common: list[str]) -> dict:
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as sample.py on a laptop
    done = subprocess.run([sys.executable, __file__, "--worker", "--tree", str(tree), "--out", str(out), *common],
                          env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"the worker in {tree} failed:\n{done.stderr[-4000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("TIMES "))[6:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--slots", type=int, default=8, help="sample.py --batch_size")
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--longest_prompt", type=int, default=320, help="prompt tokens at most (demo tokenizer)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "answer_file.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--prompts_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT))
    from lima_jax.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        old = tmp / "baseline"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        lengths = prompts_file(tmp / "prompts.jsonl", args.prompts, load_tokenizer(""), args.longest_prompt)
        save_params(tmp / "params.npz", seed=0)
        common = ["--params", str(tmp / "params.npz"), "--prompts_path", str(tmp / "prompts.jsonl"),
                  "--slots", str(args.slots), "--max_new_tokens", str(args.max_new_tokens)]
        before = run_worker(old, tmp / "old", args, common)
        after = run_worker(ROOT, tmp / "new", args, common)
        answers = {}
        for name in before:
            a, b = (tmp / side / f"{name}.jsonl" for side in ("old", "new"))
            assert a.read_bytes() == b.read_bytes(), f"{name}: the answers files differ ({a}, {b})"
            answers[name] = [json.loads(line)["answer_tokens"] for line in b.read_text().splitlines()]
    print(f"{len(lengths)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.slots} rows together, "
          f"max_new_tokens {args.max_new_tokens}; tiny config, random weights")
    for name, counts in answers.items():
        print(f"{name}: answers of {min(counts)}-{max(counts)} tokens ({sum(counts)} in all); the same file "
              f"before and after: yes")
        b, a = before[name], after[name]
        print(f"  batched (before) {b['wall_s']:.2f} s wall, {b['cpu_s']:.2f} s CPU; continuous (after) "
              f"{a['wall_s']:.2f} s wall, {a['cpu_s']:.2f} s CPU; before / after: wall {b['wall_s'] / a['wall_s']:.2f}x"
              f", CPU {b['cpu_s'] / a['cpu_s']:.2f}x")
    result = dict(prompts=len(lengths), prompt_tokens=[min(lengths), max(lengths)], slots=args.slots,
                  max_new_tokens=args.max_new_tokens, baseline=BASELINE, before=before, after=after,
                  same_answers=True)
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# A real run's step shape on one NVIDIA GPU, in about 10 minutes: Llama 3.2 1B's shapes, bfloat16,
# 8 rows of 2,048 tokens, lima_jax (cuDNN attention) against transformers + PyTorch (eager and
# torch.compile) in the same run, MFU against the card's published bfloat16 peak
# (train.metrics.PEAK_FLOPS). tests/test_benchmarks.py runs the same path on CPU at toy sizes.
# Writes benchmarks/results/train_step_gpu_llama3.2-1b.json. Extra arguments go to train_step.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python benchmarks/train_step.py --platform gpu --model llama3.2-1b --bf16-only --steps 3 --inner 5 "$@"

#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go: cuDNN attention against the XLA path (tests),
# then the train-step benchmark on the card, float32 (TF32) and bfloat16, against
# transformers + PyTorch. Extra arguments go to benchmarks/train_step.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn
python benchmarks/train_step.py --platform gpu --bf16 --steps 5 \
  --jax "lima_jax-bf16-xla:scan_layers=False,remat_policy=none,logits_chunks=1,dtype=bfloat16,attention=xla" "$@"

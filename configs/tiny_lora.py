"""The tiny demo with LoRA: rank-16 adapters on every projection and on the output head, over a
frozen bfloat16 base; the rest of configs/tiny.py's recipe (15 epochs, AdamW, linear decay).

The base is `--config.init_checkpoint`, standing in for the pretrained model LoRA assumes: a
configs/tiny.py run stopped early, e.g.
  python launch/tpu_train.py --config configs/tiny.py --workdir workdir/tiny_base --config.train.epochs=5
  python launch/tpu_train.py --config configs/tiny_lora.py --workdir workdir/tiny_lora \\
    --config.init_checkpoint=workdir/tiny_base
Why the head: a base this undertrained keeps much of what is left to learn in its output head.
With the head frozen, even full-rank training of every layer matrix stops at train loss 3.2
where full fine-tuning reaches 1.9 (docs/benchmarks.md); with a rank-16 adapter on it, LoRA
gets 1.75. Without a base (a frozen random embedding) it stops near 3.1."""

import importlib.util
import pathlib


def get_config():
    spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).with_name("tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.lora.update(rank=16, alpha=32.0, base_dtype="bfloat16", targets=("q", "k", "v", "o", "gate", "up", "down", "head"))
    # The adapters start at b = 0 and move the model through a rank-16 product: a larger step
    # than full fine-tuning's, as configs/llama65b_lora.py takes 10x LIMA's (here 3.3x tiny's).
    c.optimizer.update(learning_rate=1e-2, end_learning_rate=1e-3)
    return c

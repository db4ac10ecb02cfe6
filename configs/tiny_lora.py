"""The tiny demo with LoRA: rank-16 adapters on every projection of a frozen base.

Without `--config.init_checkpoint` the base is the seed's random init (what configs/tiny.py
starts from), so the demo runs anywhere; give a tiny checkpoint to adapt trained weights."""

import importlib.util
import pathlib


def get_config():
    spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).with_name("tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.lora.update(rank=16, alpha=32.0, base_dtype="bfloat16")
    # Adapters start at zero and move only the projections, so they take a larger step than full
    # fine-tuning's 3e-3 to fit the demo data in the same 15 epochs (LoRA papers use 10x or more).
    c.optimizer.update(learning_rate=1e-2, end_learning_rate=1e-3)
    return c

"""Llama 3.x 70B with the LIMA recipe, trained as LoRA adapters on a frozen bfloat16 base.

The settings of configs/llama65b_lora.py (rank 16 on every projection, alpha 16, dropout 0.05,
learning rate 1e-4 -> 1e-5; QLoRA's for 65B) on configs/llama3_70b.py's model.
`--config.lora.base_dtype=int8` stores the base in int8 with per-channel scales."""

import importlib.util
import pathlib


def get_config():
    spec = importlib.util.spec_from_file_location("llama3_70b", pathlib.Path(__file__).with_name("llama3_70b.py"))
    llama3_70b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(llama3_70b)
    c = llama3_70b.get_config()
    c.lora.update(rank=16, alpha=16.0, dropout=0.05, base_dtype="bfloat16")
    c.optimizer.update(learning_rate=1e-4, end_learning_rate=1e-5)  # see configs/llama65b_lora.py
    return c

"""LLaMA 65B with the LIMA recipe, trained as LoRA adapters on a frozen bfloat16 base.

Rank 16 on every projection (q, k, v, o, gate, up, down), alpha 16, dropout 0.05: QLoRA
(Dettmers et al. 2023) found adapters on all projections matter and the rank barely does, and
used dropout 0.05 at 65B. 200M adapter parameters, 0.8 GB in float32. The recipe is LIMA's
otherwise (AdamW b2 0.95, weight decay 0.1, linear decay without warmup, 15 epochs, 32 examples
a step, residual dropout 0.0 -> 0.3). `--config.lora.base_dtype=int8` stores the base in int8 with per-channel scales."""

import importlib.util
import pathlib


def get_config():
    spec = importlib.util.spec_from_file_location("llama65b", pathlib.Path(__file__).with_name("llama65b.py"))
    llama65b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(llama65b)
    c = llama65b.get_config()
    c.lora.update(rank=16, alpha=16.0, dropout=0.05, base_dtype="bfloat16")
    # Learning rate 10x LIMA's: the adapters start at zero (b = 0) and move the model only through
    # a rank-16 product, so full fine-tuning's 1e-5 would barely move them in LIMA's 446 steps;
    # 1e-4 is what QLoRA used for 65B. Linear decay to a tenth, as LIMA's 1e-5 -> 1e-6.
    c.optimizer.update(learning_rate=1e-4, end_learning_rate=1e-5)
    return c

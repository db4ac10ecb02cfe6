"""Checkpoint conversion: Meta `.pth` / Hugging Face safetensors <-> the model's parameters.

- `layout`: the one key map and per-tensor transforms (Meta, HF, ours); `layout(cfg)` is a
  family's subset (Qwen2 biases, Qwen3 q/k norms, no `lm_head` when tied).
- `hf_config`: HF config.json per family (llama, mistral, qwen2, qwen3) read (RoPE old and
  new with llama3/linear scaling, tied embeddings; refusals) and written.
- `sources`: streaming readers for Meta and HF folders, with the shape/key checks.
- `tokenizer_files`: the tokenizer (SentencePiece or tokenizer.json) stored with converted
  weights; HF tokenizer files (end-of-turn token, the chat format's template) for an export.
- `safety`: where a converter may write (never over or inside its input).
- `to_orbax.convert_to_orbax`: a folder -> Orbax checkpoint, one layer's tensor at a time.
- `to_hf.export_hf`: an Orbax checkpoint -> HF folder (trims vocab padding, keeps EOT), one
  tensor at a time.
- Host memory: `lima_jax.hostmem`'s glibc heap settings keep RSS at about one tensor while
  streaming.
"""

from lima_jax.convert.errors import ConversionError
from lima_jax.convert.to_hf import export_hf
from lima_jax.convert.to_orbax import convert_to_orbax

__all__ = ["ConversionError", "convert_to_orbax", "export_hf"]

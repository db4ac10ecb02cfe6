"""Checkpoint conversion: Meta `.pth` / Hugging Face safetensors <-> the model's parameters."""

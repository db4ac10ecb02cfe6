"""A LoRA training checkpoint -> a PEFT adapter folder: `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained` loads onto the Hugging
Face export of the base (`export_hf` of the checkpoint the adapters were trained on).

PEFT's names and layout: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[rank, in] and `...lora_B.weight` [out, rank], from our stacked a [layers, *in, rank] and
b [layers, rank, *out] (lima_jax.model.lora); `base_model.model.lm_head.lora_{A,B}.weight`
for an adapted head (its padding rows cut to the vocabulary); its `lora_alpha` / `r` scale is ours.
(The merged Hugging Face export of a LoRA checkpoint is `export_hf`'s, through `model_store.MergedReader`.)
"""

import json

import numpy as np

from lima_jax import model_store
from lima_jax.convert.safetensors_stream import SafetensorsStream
from lima_jax.convert.safety import export_target, writing_into
from lima_jax.model.lora import HEAD, HF_MODULES, LoraConfig, get_path, target_path

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_tensors(adapters: dict, lora: LoraConfig, vocab_size: int) -> dict[str, np.ndarray]:
    """PEFT's state dict (name -> array) of our adapters (`{"layers": {module: {weight: {a, b}}}}`,
    and `{"lm_head": {a, b}}` for an adapted head)."""
    out = {}
    for name in lora.targets:
        a, b = (np.asarray(get_path(adapters, target_path(name)[0])[k]) for k in ("a", "b"))
        if name == HEAD:
            out["base_model.model.lm_head.lora_A.weight"] = a.T
            out["base_model.model.lm_head.lora_B.weight"] = b[:, :vocab_size].T
            continue
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[name]}"
            out[f"{prefix}.lora_A.weight"] = a[i].reshape(-1, lora.rank).T
            out[f"{prefix}.lora_B.weight"] = b[i].reshape(lora.rank, -1).T
    return out


def adapter_config(lora: LoraConfig, base_model_name_or_path: str = "") -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in lora.targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model_name_or_path}


def export_peft(checkpoint_path, output, *, base_model_name_or_path: str = "", overwrite: bool = False) -> dict:
    """Write the PEFT adapter folder of a LoRA checkpoint (work dir, manager root or step).
    `base_model_name_or_path` goes into adapter_config.json (where the HF export of the base lives).
    Atomic: written to `<output>.tmp-export` and renamed when complete."""
    out, tmp = export_target(checkpoint_path, output, overwrite=overwrite)
    meta = model_store.read_meta(checkpoint_path)
    lora = model_store.lora_of(meta, checkpoint_path).settings
    tensors = peft_tensors(model_store.read_adapters(checkpoint_path, lora), lora, meta.model.vocab_size)
    with writing_into(tmp, out):
        specs = [(k, v.shape, v.nbytes) for k, v in tensors.items()]
        with SafetensorsStream(tmp / ADAPTER_WEIGHTS, specs, "float32") as stream:
            for k, v in tensors.items():
                stream.add(k, v.astype(np.float32))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, base_model_name_or_path), indent=2))
    return {"output": str(out), "tensors": len(tensors), "bytes_written": sum(s[2] for s in specs), "lora": lora}

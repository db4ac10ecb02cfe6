"""A LoRA training checkpoint -> a PEFT adapter folder: `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained` loads onto the Hugging
Face export of the base (`export_hf` of the checkpoint the adapters were trained on).

PEFT's names and layout: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[rank, in] and `...lora_B.weight` [out, rank], from our stacked a [layers, *in, rank] and
b [layers, rank, *out] (lima_jax.model.lora); `base_model.model.lm_head.lora_{A,B}.weight`
for an adapted head (its padding rows cut to the vocabulary); its `lora_alpha` / `r` scale is ours.
(The merged Hugging Face export of a LoRA checkpoint is `export_hf`'s.)
"""

import json

import numpy as np

from lima_jax import checkpoint
from lima_jax.convert.errors import ConversionError
from lima_jax.convert.safety import export_target, writing_into
from lima_jax.convert.to_hf import _SafetensorsStream
from lima_jax.model.lora import HEAD, HF_MODULES, TARGETS, LoraConfig, get_path, set_path, target_path

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_settings(meta: checkpoint.CheckpointMeta, checkpoint_path) -> LoraConfig:
    lora = LoraConfig.from_record(meta.lora)
    if lora is None:
        raise ConversionError(f"{checkpoint_path} is not a LoRA checkpoint (its meta records no lora settings)")
    return lora


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


def read_adapters(checkpoint_path, lora: LoraConfig) -> dict:
    """The adapters of a LoRA checkpoint as numpy arrays (they are small: read whole)."""
    reader = checkpoint.ParamsReader(checkpoint_path)
    adapters: dict = {}
    for name in lora.targets:
        path = target_path(name)[0]
        set_path(adapters, path, {k: np.asarray(reader.read((*path, k)), np.float32) for k in ("a", "b")})
    return adapters


def export_peft(checkpoint_path, output, *, base_model_name_or_path: str = "", overwrite: bool = False) -> dict:
    """Write the PEFT adapter folder of a LoRA checkpoint (work dir, manager root or step).
    `base_model_name_or_path` goes into adapter_config.json (where the HF export of the base lives).
    Atomic: written to `<output>.tmp-export` and renamed when complete."""
    out, tmp = export_target(checkpoint_path, output, overwrite=overwrite)
    meta = checkpoint.read_meta(checkpoint_path)
    lora = lora_settings(meta, checkpoint_path)
    tensors = peft_tensors(read_adapters(checkpoint_path, lora), lora, meta.model["vocab_size"])
    with writing_into(tmp, out):
        specs = [(k, v.shape, v.nbytes) for k, v in tensors.items()]
        with _SafetensorsStream(tmp / ADAPTER_WEIGHTS, specs, "float32") as stream:
            for k, v in tensors.items():
                stream.add(k, v.astype(np.float32))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, base_model_name_or_path), indent=2))
    return {"output": str(out), "tensors": len(tensors), "bytes_written": sum(s[2] for s in specs), "lora": lora}


class MergedReader:
    """A LoRA checkpoint read like a full one (`checkpoint.ParamsReader`'s `array` / `read`): the
    tensors of its base (`meta.lora.base_checkpoint`) as training held them (rounded to
    `base_dtype`, an int8 base quantized per channel), with a b * alpha / rank added to each
    adapted weight. `export_hf` writes a LoRA checkpoint's merged model through it."""

    def __init__(self, checkpoint_path, meta: checkpoint.CheckpointMeta):
        self.lora = lora_settings(meta, checkpoint_path)
        base = meta.lora.get("base_checkpoint")
        if not base:
            raise ConversionError(f"{checkpoint_path}: its adapters were trained on a random-init base (seed "
                                  f"{meta.lora.get('base_seed')}), not on stored weights: there is no base to merge")
        self.base = checkpoint.ParamsReader(base)
        self.adapters = read_adapters(checkpoint_path, self.lora)
        self.inputs = {("layers", *path): n_in for path, n_in in TARGETS.values()}  # layer matrices: input dims
        self.pairs = {target_path(name)[0]: name for name in self.lora.targets}

    def array(self, path: tuple[str, ...]):
        return self.base.array(path)

    def read(self, path: tuple[str, ...], index=None) -> np.ndarray:
        w = self._as_trained(path, self.base.read(path, index), stacked=index is None)
        if path not in self.pairs:
            return w
        _, lead, _ = target_path(self.pairs[path])
        pair = get_path(self.adapters, path)
        a, b = (pair[k] if index is None else pair[k][None, index] for k in ("a", "b"))  # index: one layer
        rank = self.lora.rank
        delta = np.matmul(a.reshape(*a.shape[:lead], -1, rank), b.reshape(*b.shape[:lead], rank, -1))
        return w + delta.reshape(w.shape) * np.float32(self.lora.scale)

    def _as_trained(self, path, w: np.ndarray, stacked: bool) -> np.ndarray:
        import jax.numpy as jnp
        import ml_dtypes

        from lima_jax.model.lora import quantize

        if self.lora.base_dtype == "float32":
            return w.astype(np.float32)
        if self.lora.base_dtype == "int8" and path in self.inputs:
            q = quantize(jnp.asarray(w, jnp.float32) if stacked else jnp.asarray(w, jnp.float32)[None], self.inputs[path])
            return np.asarray(q.astype(jnp.float32)).reshape(w.shape)
        return w.astype(ml_dtypes.bfloat16).astype(np.float32)

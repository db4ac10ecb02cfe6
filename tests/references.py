"""Independent reference models: the transformers/torch LLaMA builders, the small ModelConfigs
the model tests compare them on, and logits from either side. Not a test module: test modules
import from here, never from each other."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from lima_jax.convert.layout import params_from_hf
from lima_jax.model import ModelConfig, bind

# Exact float32 matmuls for the parity checks (each module comparing against a reference sets it too).
jax.config.update("jax_default_matmul_precision", "highest")


def hf_model(cfg: ModelConfig, seed=0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    # HF initialises norms to 1; random norms make the parity test see the norm mapping too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_params(model, cfg):
    return params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, cfg)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def our_logits(cfg, params, tokens):
    return np.asarray(bind(cfg, params)(jnp.asarray(tokens)))[..., : cfg.vocab_size]


# The model tests' configs (test_model.py, test_sampling.py). The conversion tests use their own,
# sized for Meta's params.json: convert_fixtures.CONVERT_MHA / CONVERT_GQA.
MODEL_MHA = ModelConfig(vocab_size=250, dim=64, n_layers=3, n_heads=4, n_kv_heads=4, ffn_dim=160, rope_theta=10000.0)
MODEL_GQA = ModelConfig(vocab_size=256, dim=96, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=200, norm_eps=1e-5,
                        rope_theta=500000.0)

"""LIMA's optimizer: AdamW with a linear learning-rate decay and a weight-decay mask.

Weight decay applies to the matrices (projections, MLP, embedding and output head), not to
the RMSNorm scales: decaying a norm's gain toward 0 shrinks the layer's output rather than
regularising it, the usual choice for LLaMA fine-tuning (and HF Trainer's default for norms);
nor to Qwen2's q/k/v biases (HF Trainer's default for biases).
"""

import jax
import optax


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """learning_rate -> end_learning_rate linearly over `total_steps` (after optional warmup)."""
    warmup = int(opt_cfg.warmup_steps)
    decay = optax.linear_schedule(opt_cfg.learning_rate, opt_cfg.end_learning_rate, max(total_steps - 1 - warmup, 1))
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, opt_cfg.learning_rate, warmup), decay], [warmup])


def decay_mask(params):
    """True for every parameter but the norm scales and biases (found by name: stacked per-layer
    scales are [layers, dim], so shape alone would not tell them from matrices)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(w in str(getattr(k, "key", k)) for k in path for w in ("norm", "bias")), params)


def make_optimizer(opt_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW on `schedule` (see learning_rate_schedule), after global-norm clipping if set."""
    parts = []
    if opt_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)

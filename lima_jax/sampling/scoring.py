"""The log-probability of every token of a prompt given the tokens before it: the server's `echo`
with `logprobs` (what lm-evaluation-harness's loglikelihood tasks read).

One forward pass over the whole prompt, as training sees it (no cache, no slots): position i's
logits score token i + 1. Log-probabilities are the model's own (log-softmax over the real
vocabulary, no decoding transform), the same quantity the decode step reports for answer tokens.
Prompts are right-padded to a multiple of PROMPT_BUCKET (causal attention: the padding changes
nothing before it), so one compilation per width.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lima_jax.model import ModelConfig, bind
from lima_jax.sampling.decode import PROMPT_BUCKET, TOP_LOGPROBS, Decoder
from lima_jax.sharding import constrain


@functools.partial(jax.jit, static_argnames=("cfg",))
def prompt_logprobs(cfg: ModelConfig, params: dict, tokens: jax.Array) -> dict:
    """tokens [M, W] -> for tokens 1..W-1 of each row: {"logprob" [M, W-1], "top_ids" [M, W-1, K],
    "top_logprobs" [M, W-1, K]} (K = TOP_LOGPROBS), replicated."""
    logits = bind(cfg, params)(tokens)[:, :-1, :cfg.vocab_size].astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits)
    scored = jnp.minimum(tokens[:, 1:], cfg.vocab_size - 1)  # padding may hold any id
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    out = {"logprob": jnp.take_along_axis(logprobs, scored[..., None], -1)[..., 0],
           "top_ids": top_ids.astype(jnp.int32), "top_logprobs": top_logprobs}
    return {name: constrain(x, *(None,) * x.ndim) for name, x in out.items()}


def score_prompts(decoder: Decoder, prompts: list[tuple[int, ...]]) -> list[dict]:
    """Each prompt's {"logprob" [P-1], "top_ids" [P-1, K], "top_logprobs" [P-1, K]} (numpy), on the
    decoder's model and mesh, in rows of the mesh's batch shards."""
    results = []
    for start in range(0, len(prompts), decoder.group):
        batch = prompts[start:start + decoder.group]
        width = min(math.ceil(max(map(len, batch)) / PROMPT_BUCKET) * PROMPT_BUCKET, decoder.length)
        tokens = np.zeros((decoder.group, width), np.int32)
        for row, prompt in enumerate(batch):
            tokens[row, :len(prompt)] = prompt
        with decoder.on_mesh():
            out = jax.device_get(prompt_logprobs(decoder.cfg, decoder.params, tokens))
        results += [{name: value[row, :len(prompt) - 1] for name, value in out.items()}
                    for row, prompt in enumerate(batch)]
    return results

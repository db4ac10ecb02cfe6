"""Host side of sampling: a model ready to answer (`Sampler`), prompts formatted as in training,
answers decoded by the one decode step (decode.py) with continuous batching, streamed text,
a LIMA jsonl file answered into an answers file.

The prompt format is the checkpoint's chat format (lima_jax.data.chat_format: `lima`, `llama3`,
`chatml`), so a fine-tuned model sees exactly what it was taught; `fmt="raw"` feeds the text
as-is after BOS, for base models. Answers end with the format's end-of-turn token; raw
continuations end with EOS (both stop every format).
"""

import dataclasses
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.sharding import Mesh

from lima_jax.data import chat_format
from lima_jax.model import ModelConfig, lora
from lima_jax.sampling.decode import PROMPT_BUCKET, Decoder, Request
from lima_jax.sampling.decoding import LIMA, SamplingSettings
from lima_jax.sampling.prefix_cache import PrefixCache
from lima_jax.sampling.text import TextStream

log = logging.getLogger(__name__)

FORMATS = (*chat_format.FORMATS, "raw")
SLOTS = 8  # rows decoded together by default (sample.py's --batch_size)
STEPS = 8  # tokens a slot advances per host round trip (decode_steps); a finished slot waits at most this


@dataclasses.dataclass
class Sampler:
    """A model ready to answer: config, params (placed on `mesh`), tokenizer.

    `tokenizer`: a lima_jax.data.tokenizer.Tokenizer. `chat_format`: the format prompts are
    written in unless a call names another (the checkpoint's). `generation_eos_ids`: the stop
    ids of a converted HF model's generation_config.json (transformers' `generate` stops there)."""

    cfg: ModelConfig
    params: dict
    tokenizer: object
    mesh: Mesh | None = None
    chat_format: str = "lima"
    generation_eos_ids: tuple[int, ...] = ()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """EOS, EOT where the model has it (a base model's vocabulary ends before EOT's id), the
        format's end-of-turn token and the converted model's own generation stop ids."""
        ids = {self.tokenizer.eot_id, self.tokenizer.eos_id, *chat_format.stop_ids(self.tokenizer, self.chat_format),
               *self.generation_eos_ids}
        return tuple(sorted(int(i) for i in ids if i is not None and i < self.cfg.vocab_size))

    def prompt_ids(self, turns: str | Sequence[str], fmt: str | None = None, system: str | None = None) -> list[int]:
        """Token ids of a prompt: a user message, or a conversation ending with a user turn, in
        `fmt` (default: the checkpoint's chat format), with a system message where it has one."""
        turns = [turns] if isinstance(turns, str) else list(turns)
        fmt = fmt or self.chat_format
        if fmt == "raw":
            return [self.tokenizer.bos_id] * (self.tokenizer.bos_id is not None) + self.tokenizer.encode("\n".join(turns))
        if fmt not in FORMATS:
            raise ValueError(f"format={fmt!r}; choose one of {FORMATS}")
        if chat_format.end_of_turn_id(self.tokenizer, fmt) >= self.cfg.vocab_size:  # a base model without EOT
            raise ValueError(f"format {fmt!r} needs an end-of-turn token, but this checkpoint is a base model "
                             f"without one (vocab_size {self.cfg.vocab_size} = the tokenizer's pieces): sample "
                             "it with --format raw, or convert it with --add_eot (and fine-tune it) first")
        return chat_format.prompt_ids(turns, self.tokenizer, fmt, system)

    def decoder(self, slots: int, length: int | None = None, prompt_width: int | None = None,
                prefix_cache_bytes: int = 0) -> Decoder:
        """The decode step's slots over this model (`length`: cache positions, the model's context
        by default; `prompt_width`: see Decoder), with a prefix cache of `prefix_cache_bytes`
        (0: none; lima_jax.sampling.prefix_cache)."""
        cache = PrefixCache(self.cfg, prefix_cache_bytes) if prefix_cache_bytes else None
        return Decoder(self.cfg, self.params, self.mesh, self.stop_ids, slots, length, prompt_width, cache)

    def decode(self, requests: Sequence[Request], slots: int = SLOTS,
               on_token: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, dict]]:
        """Decode requests in `slots` slots, continuous batching: a finished row takes the next
        request at once. Yields (index in `requests`, {"ids", "stopped"}) as each answer ends,
        so out of order; `on_token(index, token)` gets each answer token as it is picked.

        The cache holds the longest prompt (bucketed) plus the largest max_tokens; positions past
        model.max_seq_len were never trained (a warning). Every prefill pads to the longest
        prompt, and takes either every slot (the first) or one prompt (a slot that came free; a
        few at once take one prefill each), so two prefill shapes and one step compile. The
        device runs STEPS tokens per call (`decode_steps`), so `on_token` comes in bursts."""
        if not requests:
            return
        longest = max(len(r.prompt) for r in requests)
        most = max(r.max_tokens for r in requests)
        if longest + most > self.cfg.max_seq_len:
            log.warning("prompt (%d tokens) + max_new_tokens (%d) exceed model.max_seq_len=%d: positions "
                        "beyond it were never trained", longest, most, self.cfg.max_seq_len)
        width = math.ceil(longest / PROMPT_BUCKET) * PROMPT_BUCKET
        decoder = self.decoder(min(slots, len(requests)), width + most, width)
        waiting, answers = deque(enumerate(requests)), {}
        decoder.admit([waiting.popleft() for _ in range(min(decoder.num_slots, len(waiting)))])
        while waiting or decoder.active:
            for _ in range(min(len(decoder.free), len(waiting))):
                decoder.admit([waiting.popleft()])
            _, events = decoder.step(STEPS)
            for _, index, token, reason in events:
                ids = answers.setdefault(index, [])
                if reason != "stop":
                    ids.append(token)
                    if on_token is not None:
                        on_token(index, token)
                if reason is not None:
                    yield index, dict(ids=answers.pop(index), stopped=reason == "stop")

    def generate_ids(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings = LIMA, seed: int = 0,
                     row_ids: Sequence[int] | None = None, slots: int = SLOTS) -> list[dict]:
        """Answer token ids for prompt ids, in order: [{"ids", "stopped"}] per prompt.

        `row_ids` (default 0..n-1) pick each prompt's random stream, so with the same seed a
        prompt gets the same answer whatever its slot or neighbours."""
        row_ids = range(len(prompts)) if row_ids is None else row_ids
        requests = [Request.of(p, settings, seed, int(r)) for p, r in zip(prompts, row_ids, strict=True)]
        out = dict(self.decode(requests, slots))
        return [out[i] for i in range(len(prompts))]

    def answer(self, turns: str | Sequence[str], settings: SamplingSettings = LIMA, seed: int = 0,
               fmt: str | None = None, stream: Callable[[str], None] | None = None, system: str | None = None) -> dict:
        """One prompt (stream id 0) -> {"answer", "prompt_tokens", "answer_tokens", "stopped"};
        `stream(text)` gets each settled piece of text as it is decoded (the pieces join to the answer)."""
        ids = self.prompt_ids(turns, fmt, system)
        text = TextStream(self.tokenizer)
        on_token = None if stream is None else lambda _, token: stream(text.add(token))
        [(_, out)] = self.decode([Request.of(ids, settings, seed)], 1, on_token)
        if stream is not None:
            stream(text.finish())
        return dict(answer=self.tokenizer.decode(out["ids"]), prompt_tokens=len(ids),
                    answer_tokens=len(out["ids"]), stopped=out["stopped"])


def answer_file(sampler: Sampler, prompts_path: str, output_path: str, settings: SamplingSettings = LIMA,
                batch_size: int = SLOTS, seed: int = 0, fmt: str | None = None, progress: bool = True,
                overwrite: bool = False, resume: bool = False) -> dict:
    """Answer every line of a LIMA-format jsonl file (`{"conversations": [user, ...]}`, ending
    with a user turn) in `batch_size` slots, continuous batching: a finished answer's slot takes
    the next prompt at once. Answers end out of order; they are appended in file order (one JSON
    line per prompt: the prompt, the answer, token counts, the settings) as soon as every
    earlier one is written. Prompt i draws its own stream (seed, i), so the file does not depend
    on the slots. An existing output is refused unless `overwrite`, or `resume`d after the
    prompts it already answers (same prompts, same settings: the file ends as an uninterrupted
    run's). Returns a summary (counts, tokens/s)."""
    from tqdm import tqdm

    from lima_jax.sampling.answers import AnswersFile, check_resumed, read_prompts

    answers = AnswersFile(output_path, overwrite, resume)
    records = read_prompts(prompts_path)
    fmt = fmt or sampler.chat_format
    meta = json.loads(json.dumps(dict(settings.as_dict(), seed=seed, format=fmt, stop_ids=list(sampler.stop_ids))))
    check_resumed(answers.done, records, meta, output_path, prompts_path)
    prompts = [sampler.prompt_ids(turns, fmt) for _, turns in records]
    first = len(answers.done)
    requests = [Request.of(prompts[i], settings, seed, i) for i in range(first, len(records))]
    started, new_tokens, finished, written = time.time(), 0, {}, first
    with tqdm(total=len(records), initial=first, disable=not progress, unit="prompt", desc="answering") as bar:
        for index, out in sampler.decode(requests, batch_size):
            finished[first + index] = out
            new_tokens += len(out["ids"])
            ready = []
            while written in finished:  # file order: an answer waits for the ones before it
                ready.append(_answer_row(sampler, records[written], prompts[written], finished.pop(written), meta))
                written += 1
            if ready:
                answers.append(ready)
            bar.update(1)
            bar.set_postfix(tok_s=f"{new_tokens / (time.time() - started):.1f}")
    seconds = time.time() - started
    return {"prompts": len(records), "resumed": first, "answer_tokens": new_tokens, "seconds": seconds,
            "tokens_per_second": new_tokens / max(seconds, 1e-9)}


def _answer_row(sampler: Sampler, record: tuple[int, list[str]], prompt: list[int], out: dict, meta: dict) -> dict:
    line, turns = record
    return {"line": line, "conversations": list(turns), "prompt": turns[-1],
            "answer": sampler.tokenizer.decode(out["ids"]), "prompt_tokens": len(prompt),
            "answer_tokens": len(out["ids"]), "stopped": out["stopped"], "settings": meta}


def load_sampler(checkpoint_path: str, config=None, tokenizer_path: str | None = None, mesh_overrides: dict | None = None
                 ) -> tuple[Sampler, object]:
    """(Sampler, effective ml-collections config) of a checkpoint step, checkpoint root or training
    work dir: lima_jax.model_store.load_model (config, tokenizer, LoRA base and adapters). A LoRA
    checkpoint decodes as it trained: its frozen base (int8 stays int8) with the adapters
    unmerged beside it (model.lora.attach), so the devices never hold a merged copy of the base."""
    from lima_jax.model_store import load_model

    model = load_model(checkpoint_path, config=config, tokenizer_path=tokenizer_path, merge_lora=False,
                       mesh_overrides=mesh_overrides)
    params = model.params
    if model.adapters is not None:
        with jax.set_mesh(model.mesh):  # an adapted head is merged, on the head's devices
            params = lora.attach(params, model.adapters, model.meta.lora.settings)
    return Sampler(model.model, params, model.tokenizer, model.mesh, model.meta.chat_format or "lima",
                   tuple(model.meta.source.get("generation_eos_ids") or ())), model.config

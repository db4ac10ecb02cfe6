"""Host side of sampling: load a checkpoint onto a mesh, format prompts as in training, batch
them (padding to few shapes so few compilations), answer a LIMA jsonl file, stream tokens.

The prompt format is the checkpoint's chat format (lima_jax.data.chat_format: `lima`, `llama3`,
`chatml`), so a fine-tuned model sees exactly what it was taught; `fmt="raw"` feeds the text
as-is after BOS, for base models. Answers end with the format's end-of-turn token; raw
continuations end with EOS (both stop every format).
"""

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lima_jax.data import chat_format
from lima_jax.model import ModelConfig
from lima_jax.sampling.generate import generate
from lima_jax.sampling.transforms import SamplingSettings
from lima_jax.sharding import logical_to_spec

log = logging.getLogger(__name__)

FORMATS = (*chat_format.FORMATS, "raw")
PROMPT_BUCKET = 64  # prompts are right-padded to a multiple of this: one compilation per bucket


@dataclasses.dataclass
class Sampler:
    """A model ready to answer: config, params (placed on `mesh`), tokenizer.

    `tokenizer`: a lima_jax.data.tokenizer.Tokenizer. `chat_format`: the format prompts are
    written in unless a call names another (the checkpoint's)."""

    cfg: ModelConfig
    params: dict
    tokenizer: object
    mesh: Mesh | None = None
    chat_format: str = "lima"

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """EOS, and EOT where the model has it (a base model's vocabulary ends before EOT's id)."""
        ids = {self.tokenizer.eot_id, self.tokenizer.eos_id, *chat_format.stop_ids(self.tokenizer, self.chat_format)}
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

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        spec = logical_to_spec(("batch",), self.mesh.axis_names)[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
        return math.prod(self.mesh.shape[a] for a in axes)

    def generate_ids(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, seed: int = 0,
                     row_ids: Sequence[int] | None = None,
                     on_token: Callable[[np.ndarray, np.ndarray], None] | None = None) -> list[dict]:
        """Answer token ids for a batch of prompt ids: [{"ids", "stopped"}] per prompt.

        `row_ids` (default 0..n-1) pick each prompt's random stream, so with the same seed a
        prompt gets the same answer whatever batch it is in. `on_token(step, tokens [B])` is
        called from the device loop as tokens come (streaming)."""
        n = len(prompts)
        row_ids = list(range(n)) if row_ids is None else list(row_ids)
        longest = max(len(p) for p in prompts)
        width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
        if longest + settings.max_new_tokens > self.cfg.max_seq_len:
            log.warning("prompt (%d tokens) + max_new_tokens (%d) exceed model.max_seq_len=%d: positions "
                        "beyond it were never trained", longest, settings.max_new_tokens, self.cfg.max_seq_len)
        rows = -(-n // self._batch_multiple()) * self._batch_multiple()
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)  # filler rows: one token
        ids = np.zeros(rows, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
            ids[i] = row_ids[i]
        args = (tokens, lengths, ids)
        if self.mesh is not None:
            shard = lambda a: jax.device_put(a, NamedSharding(  # noqa: E731
                self.mesh, logical_to_spec(("batch", "length")[:a.ndim], self.mesh.axis_names)))
            args = tuple(shard(a) for a in args)
        callback = None
        if on_token is not None:
            callback = _StreamCallback(on_token, n)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            out = generate(self.cfg, settings, self.params, args[0], args[1], jax.random.key(seed),
                           row_ids=args[2], stop_ids=self.stop_ids, on_token=callback)
        out = jax.device_get(out)
        return [dict(ids=out["tokens"][i, :out["lengths"][i]].tolist(), stopped=bool(out["stopped"][i]))
                for i in range(n)]

    def answer(self, turns: str | Sequence[str], settings: SamplingSettings = SamplingSettings(), seed: int = 0,
               fmt: str | None = None, stream: Callable[[str], None] | None = None, system: str | None = None) -> dict:
        """One prompt -> {"answer", "prompt_tokens", "answer_tokens", "stopped"}; `stream(text)` gets
        each new piece of text as it is decoded."""
        ids = self.prompt_ids(turns, fmt, system)
        on_token = None
        if stream is not None:
            on_token = _TextStream(self.tokenizer, stream, self.stop_ids)
        [out] = self.generate_ids([ids], settings, seed, on_token=on_token)
        return dict(answer=self.tokenizer.decode(out["ids"]), prompt_tokens=len(ids),
                    answer_tokens=len(out["ids"]), stopped=out["stopped"])


class _StreamCallback:
    """Hashable by identity (a static argument of the jitted loop). Ordered callbacks are not
    allowed on several devices, so steps may arrive out of order (or twice): they are held
    back and passed on in step order, once each. Filler rows are trimmed."""

    def __init__(self, fn: Callable, rows: int):
        self.fn, self.rows, self.next, self.pending = fn, rows, 0, {}

    def __call__(self, step, tokens):
        step = int(step)
        if step >= self.next:
            self.pending[step] = np.asarray(tokens)[: self.rows]
        while self.next in self.pending:
            self.fn(self.next, self.pending.pop(self.next))
            self.next += 1


class _TextStream:
    """Decode the growing answer of row 0 and emit only the new text (SentencePiece joins pieces
    with context, so the whole answer is decoded each time and the new suffix printed)."""

    def __init__(self, tokenizer, emit, stop_ids):
        self.tokenizer, self.emit, self.stop_ids = tokenizer, emit, set(stop_ids)
        self.ids, self.text, self.done = [], "", False

    def __call__(self, step, tokens):
        token = int(tokens[0])
        if self.done or token in self.stop_ids:
            self.done = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.text):
            self.emit(text[len(self.text):])
            self.text = text


def answer_file(sampler: Sampler, prompts_path: str, output_path: str, settings: SamplingSettings = SamplingSettings(),
                batch_size: int = 8, seed: int = 0, fmt: str | None = None, progress: bool = True,
                overwrite: bool = False, resume: bool = False) -> dict:
    """Answer every line of a LIMA-format jsonl file (`{"conversations": [user, ...]}`, ending
    with a user turn), `batch_size` prompts at a time in file order; append one JSON line per
    prompt (the prompt, the answer, token counts, the settings) as each batch finishes. An
    existing output is refused unless `overwrite`, or `resume`d after the prompts it already
    answers (same prompts, same settings: answers do not depend on the batch, so the file ends
    as an uninterrupted run's). Returns a summary (counts, tokens/s)."""
    from tqdm import tqdm

    from lima_jax.sampling.answers import AnswersFile, check_resumed, read_prompts

    answers = AnswersFile(output_path, overwrite, resume)
    records = read_prompts(prompts_path)
    fmt = fmt or sampler.chat_format
    meta = json.loads(json.dumps(dict(settings.as_dict(), seed=seed, format=fmt, stop_ids=list(sampler.stop_ids))))
    check_resumed(answers.done, records, meta, output_path, prompts_path)
    prompts = [sampler.prompt_ids(turns, fmt) for _, turns in records]
    first = len(answers.done)
    started, new_tokens = time.time(), 0
    with tqdm(total=len(records), initial=first, disable=not progress, unit="prompt", desc="answering") as bar:
        for start in range(first, len(records), batch_size):
            chunk = range(start, min(start + batch_size, len(records)))
            outs = sampler.generate_ids([prompts[i] for i in chunk], settings, seed, row_ids=list(chunk))
            answers.append([_answer_row(sampler, records[i], prompts[i], out, meta) for i, out in zip(chunk, outs)])
            new_tokens += sum(len(out["ids"]) for out in outs)
            bar.update(len(chunk))
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
    work dir: lima_jax.model_store.load_model (config, tokenizer, LoRA base and adapters merged)."""
    from lima_jax.model_store import load_model

    model = load_model(checkpoint_path, config=config, tokenizer_path=tokenizer_path, mesh_overrides=mesh_overrides)
    return Sampler(model.model, model.params, model.tokenizer, model.mesh, model.meta.chat_format or "lima"), model.config

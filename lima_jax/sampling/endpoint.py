"""Answers from any OpenAI-compatible endpoint (`sample.py --endpoint`): a baseline model's
answers in the answers-file format of `sample.py --checkpoint` (answers.py), so the two pair in
`judge.py` by prompt.

Each prompt is one chat request with LIMA's decoding settings (`SamplingSettings`): greedy is
`temperature: 0`; the repetition penalty and top-k, which OpenAI's API lacks, go in the body as
the extensions our server and vLLM read (pass `repetition_penalty=1.0` and `top_k=0` to leave
them out for an endpoint that refuses unknown fields). Prompt i is sent with seed `seed + i`, so a
prompt repeated in the file gets answers of its own. The requests go through the judge's client
(lima_jax/evaluation/client.py): concurrency, retries with backoff, and the reply cache, so a
rerun sends only what has no reply yet; rows are appended in file order a chunk at a time, with
sample.py's rules for an existing output (`overwrite`, `resume`)."""

import time
from collections.abc import Sequence

from lima_jax.evaluation.client import Judge
from lima_jax.sampling.answers import AnswersFile, check_resumed, read_prompts
from lima_jax.sampling.decoding import SamplingSettings

CHUNK = 64  # prompts asked between two appends: an interruption loses at most these (their replies stay cached)


def request_params(settings: SamplingSettings, seed: int) -> dict:
    """The chat request's decoding parameters for `settings`."""
    if settings.penalize_prompt:
        raise ValueError("penalize_prompt=True has no request field at an OpenAI-compatible endpoint: the endpoint "
                         "decides which tokens its repetition penalty counts; pass --nopenalize_prompt")
    params = {"temperature": 0.0 if settings.greedy else settings.temperature, "top_p": settings.top_p,
              "max_tokens": settings.max_new_tokens, "seed": seed}
    if settings.repetition_penalty != 1.0:
        params["repetition_penalty"] = settings.repetition_penalty
    if settings.top_k > 0:
        params["top_k"] = settings.top_k
    return params


def chat_messages(turns: Sequence[str]) -> list[dict]:
    """A conversation ending with the user's turn as OpenAI messages."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def answer_file_at_endpoint(client: Judge, prompts_path: str, output_path: str, settings: SamplingSettings,
                            seed: int = 0, overwrite: bool = False, resume: bool = False, progress: bool = True
                            ) -> dict:
    """Answer every conversation of a LIMA-format jsonl file through `client`'s endpoint into
    `output_path` (see the module docstring); a summary (counts, tokens/s)."""
    from tqdm import tqdm

    answers = AnswersFile(output_path, overwrite, resume)
    records = read_prompts(prompts_path)
    meta = dict(settings.as_dict(), seed=seed, model=client.settings.model)
    check_resumed(answers.done, records, meta, output_path, prompts_path)
    first, started, new_tokens = len(answers.done), time.time(), 0
    with tqdm(total=len(records), initial=first, disable=not progress, unit="prompt", desc="answering") as bar:
        for start in range(first, len(records), CHUNK):
            chunk = range(start, min(start + CHUNK, len(records)))
            replies = client.ask_all([chat_messages(records[i][1]) for i in chunk], "answering",
                                     [request_params(settings, seed + i) for i in chunk])
            rows = [_answer_row(records[i], reply, meta) for i, reply in zip(chunk, replies)]
            answers.append(rows)
            new_tokens += sum(row["answer_tokens"] or 0 for row in rows)
            bar.update(len(rows))
    seconds = time.time() - started
    return {"prompts": len(records), "resumed": first, "answer_tokens": new_tokens, "seconds": seconds,
            "tokens_per_second": new_tokens / max(seconds, 1e-9), "sent": client.sent,
            "answered_from_cache": client.from_cache, "retries": client.retries}


def _answer_row(record: tuple[int, list[str]], reply: dict, meta: dict) -> dict:
    """The row `sampler.answer_file` writes; token counts from the reply's usage (None when the
    endpoint gives none); `stopped` unless the endpoint ended the answer otherwise than "stop"."""
    line, turns = record
    usage = reply.get("usage") or {}
    return {"line": line, "conversations": list(turns), "prompt": turns[-1], "answer": reply["text"],
            "prompt_tokens": usage.get("prompt_tokens"), "answer_tokens": usage.get("completion_tokens"),
            "stopped": reply["finish_reason"] == "stop", "settings": meta}

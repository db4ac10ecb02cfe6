"""One OpenAI completion over the engine: its choices (one engine request each: a prompt, and
sample j of `n` drawing stream j of the request's seed), their events as text pieces, and the
OpenAI bodies (whole, or server-sent event chunks as the choices' tokens come).

`usage.completion_tokens` counts the answers' tokens, not the stop token (as sample.py counts);
logprobs cover the same tokens. With `echo`, a completion's text and logprobs start with the
prompt's, the first token's log-probability null (nothing precedes it), as OpenAI's did.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from lima_jax.sampling.decode import Request
from lima_jax.sampling.text import TextStream, token_text
from lima_jax.serving.engine import Engine, Finished, PromptScores, Token


class Choice:
    """One engine request: its text pieces as the tokens come, its logprob entries (Tokens; an
    echoed prompt's first has logprob None), and why it ended."""

    def __init__(self, engine: Engine, request: Request, index: int, stop: list[str], echo: str | None,
                 on_first_event=None):
        self.engine, self.request, self.index, self.echo = engine, request, index, echo
        self.text = TextStream(engine.sampler.tokenizer, stop)
        self.prompt_entries: list[Token] = []
        self.tokens: list[Token] = []
        self.finish_reason: str | None = None
        self._on_first_event = on_first_event

    async def pieces(self) -> AsyncIterator[tuple[str, list[Token]]]:
        """(new text, the entries it came with) as the engine produces them; sets finish_reason."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        score = self.echo is not None
        rid = self.engine.submit(self.request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), score)
        try:
            while True:
                event = await events.get()
                if self._on_first_event is not None:
                    self._on_first_event, first = None, self._on_first_event
                    first()
                if isinstance(event, PromptScores):
                    self.prompt_entries = prompt_entries(self.request.prompt, event)
                    yield self.echo, self.prompt_entries
                    continue
                if isinstance(event, Finished):
                    if event.reason == "error":
                        raise RuntimeError(f"generation failed: {event.message}")
                    self.finish_reason = "length" if event.reason == "length" else "stop"
                    yield self.text.finish(), []
                    return
                self.tokens.append(event)
                piece = self.text.add(event.id)
                yield piece, [event]
                if self.text.stopped:  # a stop string: the engine need not go on
                    self.finish_reason = "stop"
                    yield self.text.finish(), []
                    return
        finally:
            if self.finish_reason is None or self.text.stopped:
                self.engine.cancel(rid)


def prompt_entries(prompt: tuple[int, ...], scores: PromptScores) -> list[Token]:
    """The echoed prompt's logprob entries: the first token without a log-probability."""
    return [Token(prompt[0], None, None, None)] + [  # type: ignore[arg-type]
        Token(t, float(lp), ids, lps) for t, lp, ids, lps in
        zip(prompt[1:], scores.logprob, scores.top_ids, scores.top_logprobs)]


class Completion:
    """The choices of one request and the OpenAI bodies of their answers. `top`: logprobs to
    report (None: none; chat's `top_logprobs`, completions' `logprobs`)."""

    def __init__(self, engine: Engine, choices: list[Choice], body, top: int | None, model_name: str, chat: bool):
        self.engine, self.choices, self.body, self.top, self.chat = engine, choices, body, top, chat
        self.tokenizer, self.model_name = engine.sampler.tokenizer, model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets = [0] * len(choices)  # characters of token text so far per choice (text_offset)

    async def events(self) -> AsyncIterator[tuple[Choice, str, list[Token] | None]]:
        """(choice, new text, its entries) from every choice as they come; entries None: the choice
        ended. A failed choice cancels the others; so does closing this iterator."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice):
            try:
                async for piece, entries in choice.pieces():
                    queue.put_nowait((choice, piece, entries))
                queue.put_nowait((choice, "", None))
            except Exception as e:
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            for _ in self.choices:
                while True:
                    item = await queue.get()
                    if isinstance(item, Exception):
                        raise item
                    yield item
                    if item[2] is None:
                        break
        finally:
            for task in tasks:  # their Choice.pieces cancel what is still in the engine
                task.cancel()

    async def complete(self) -> dict:
        async for _ in self.events():
            pass
        return await asyncio.to_thread(self.body_whole)  # logprob texts of a long prompt take a while

    def body_whole(self) -> dict:
        choices = []
        for c in self.choices:
            text = (c.echo or "") + c.text.text
            logprobs = self._logprobs(c.index, c.prompt_entries + c.tokens)
            if self.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return self._envelope("chat.completion" if self.chat else "text_completion", choices, usage=self.usage())

    async def chunks(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per choice's new text (with its logprobs), its finish, the
        usage if asked, then [DONE]."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            for c in self.choices:
                yield sse(self._envelope(kind, [self._delta(c.index, {"role": "assistant", "content": ""}, None, None)]))
        async for choice, piece, entries in self.events():
            if entries is None:
                done = {} if self.chat else ""
                yield sse(self._envelope(kind, [self._delta(choice.index, done, None, choice.finish_reason)]))
            elif piece or (entries and self.top is not None):  # logprobs come with every token
                logprobs = self._logprobs(choice.index, entries)
                yield sse(self._envelope(kind, [self._delta(choice.index, piece, logprobs, None)]))
        options = self.body.stream_options
        if options is not None and options.include_usage:
            yield sse(self._envelope(kind, [], usage=self.usage()))
        yield "data: [DONE]\n\n"

    def usage(self) -> dict:
        prompts = {c.index // self.body.n: len(c.request.prompt) for c in self.choices}  # each prompt once
        prompt, answer = sum(prompts.values()), sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}

    def _delta(self, index: int, delta, logprobs, finish_reason) -> dict:
        if self.chat:
            delta = {"content": delta} if isinstance(delta, str) else delta
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def _envelope(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model_name, "choices": choices,
               "system_fingerprint": None}
        if usage is not None:
            out["usage"] = usage
        return out

    def _logprobs(self, index: int, tokens: list[Token]) -> dict | None:
        if self.top is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(t) for t in tokens]}
        texts = [token_text(self.tokenizer, t.id)[0] for t in tokens]
        tops = [None if t.top_ids is None else self._top_by_text(t) for t in tokens]
        offsets = []
        for text in texts:  # each token's start in the text, continued across streamed chunks
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
                "text_offset": offsets}

    def _top_by_text(self, t: Token) -> dict[str, float]:
        """The legacy format's {text: logprob}: of tokens with the same text, the likeliest (the
        first; a later one would overwrite it, and lm-eval's is_greedy compares with the max)."""
        top: dict[str, float] = {}
        for i, lp in zip(t.top_ids[:self.top], t.top_logprobs[:self.top]):
            top.setdefault(token_text(self.tokenizer, int(i))[0], float(lp))
        return top

    def _chat_entry(self, t: Token) -> dict:
        text, raw = token_text(self.tokenizer, t.id)
        top = []
        for i, lp in zip(t.top_ids[:self.top], t.top_logprobs[:self.top]):
            alt, alt_raw = token_text(self.tokenizer, int(i))
            top.append({"token": alt, "logprob": float(lp), "bytes": alt_raw})
        return {"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": top}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"

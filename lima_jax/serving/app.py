"""The ASGI app (FastAPI) that speaks OpenAI's API over an Engine.

Routes: POST /v1/chat/completions (LIMA's format), POST /v1/completions (raw text after BOS,
for base models), GET /v1/models, GET /health. Streaming answers are server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`. Every refused request gets a 400 (404 for
an unknown route) with OpenAI's error body {"error": {"message", "type", "param", "code"}}.

`usage.completion_tokens` counts the answer's tokens, not the stop token (as sample.py
counts); logprobs cover the same tokens.
"""

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lima_jax.data import chat_format
from lima_jax.sampling.text import TextStream, token_text
from lima_jax.serving.engine import Engine, Finished, Request, Token
from lima_jax.serving.protocol import ChatRequest, CompletionRequest, InvalidRequest, chat_turns, settings_of


def create_app(engine: Engine, model_name: str) -> FastAPI:
    app = FastAPI(title="lima_jax", docs_url=None, redoc_url=None)
    app.state.engine, app.state.model_name = engine, model_name
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return error_response(f"{first.get('msg', 'invalid request')} ({'.'.join(loc) or 'body'})",
                              ".".join(loc) or None, 400)

    @app.exception_handler(InvalidRequest)
    async def _refused(request, exc: InvalidRequest):
        return error_response(str(exc), exc.param, 400, exc.code)

    @app.exception_handler(Exception)
    async def _failed(request, exc: Exception):  # e.g. a failed engine step: the client still gets OpenAI's body
        return error_response(f"{type(exc).__name__}: {exc}", None, 500)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return error_response(str(exc.detail), None, exc.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "slots": engine.num_slots, "active": engine.active,
                "peak_active": engine.peak_active, "steps": engine.steps, "prefix_cache": engine.prefix_cache_stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lima_jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        sampler = engine.sampler
        system, turns = chat_turns(body.messages, chat_format.HAS_SYSTEM.get(sampler.chat_format, False))
        try:
            prompt = sampler.prompt_ids(turns, system=system)
        except ValueError as e:  # a base model has no EOT to end turns with
            raise InvalidRequest(f"{e}; use /v1/completions", "messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = Job(engine, prompt, body, body.max_completion_tokens or body.max_tokens, top, model_name, chat=True)
        return job.stream_response() if body.stream else JSONResponse(await job.complete())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt = engine.sampler.prompt_ids(body.text(), "raw")
        job = Job(engine, prompt, body, body.max_tokens, body.logprobs, model_name, chat=False)
        return job.stream_response() if body.stream else JSONResponse(await job.complete())

    return app


def error_response(message: str, param: str | None, status: int, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class Job:
    """One request through the engine: its events as text pieces, then the OpenAI bodies."""

    def __init__(self, engine: Engine, prompt: list[int], body, max_tokens: int | None, top_logprobs: int | None,
                 model_name: str, chat: bool):
        limit = engine.cfg.max_seq_len
        if len(prompt) > limit - 1:
            raise InvalidRequest(f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens "
                                 f"(max_seq_len), so a prompt may have at most {limit - 1}",
                                 "messages" if chat else "prompt", "context_length_exceeded")
        room = limit - len(prompt)  # answer tokens the context still holds; a larger max_tokens is cut to it
        settings = settings_of(body)
        for token, _ in settings["logit_bias"]:
            if not 0 <= token < engine.cfg.vocab_size:
                raise InvalidRequest(f"logit_bias token {token} is outside the vocabulary "
                                     f"(0..{engine.cfg.vocab_size - 1})", "logit_bias")
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        self.request = Request(tuple(prompt), min(max_tokens or room, room), seed=seed, **settings)
        self.engine, self.body, self.chat, self.top = engine, body, chat, top_logprobs
        self.tokenizer, self.model_name = engine.sampler.tokenizer, model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text = TextStream(self.tokenizer, body.stop_strings())
        self.tokens: list[Token] = []
        self.finish_reason: str | None = None
        self._offset = 0  # characters of token text so far (completions' text_offset)

    async def pieces(self) -> AsyncIterator[tuple[str, list[Token]]]:
        """(new text, the tokens it came with) as the engine produces them; sets finish_reason."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        rid = self.engine.submit(self.request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            while True:
                event = await events.get()
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

    async def complete(self) -> dict:
        async for _ in self.pieces():
            pass
        text, logprobs = self.text.text, self._logprobs(self.tokens)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice], usage=self._usage())

    def stream_response(self) -> StreamingResponse:
        return StreamingResponse(self._events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            yield sse(self._envelope(kind, [self._choice({"role": "assistant", "content": ""}, None, None)]))
        async for piece, tokens in self.pieces():
            if piece or (tokens and self.top is not None):  # logprobs come with every token
                yield sse(self._envelope(kind, [self._choice(piece, self._logprobs(tokens), None)]))
        yield sse(self._envelope(kind, [self._choice({} if self.chat else "", None, self.finish_reason)]))
        options = self.body.stream_options
        if options is not None and options.include_usage:
            yield sse(self._envelope(kind, [], usage=self._usage()))
        yield "data: [DONE]\n\n"

    def _choice(self, delta, logprobs, finish_reason) -> dict:
        if self.chat:
            delta = {"content": delta} if isinstance(delta, str) else delta
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def _envelope(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model_name, "choices": choices,
               "system_fingerprint": None}
        if usage is not None:
            out["usage"] = usage
        return out

    def _usage(self) -> dict:
        prompt, answer = len(self.request.prompt), len(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}

    def _logprobs(self, tokens: list[Token]) -> dict | None:
        if self.top is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(t) for t in tokens]}
        texts = [token_text(self.tokenizer, t.id)[0] for t in tokens]
        tops = [{token_text(self.tokenizer, int(i))[0]: float(lp) for i, lp in
                 zip(t.top_ids[:self.top], t.top_logprobs[:self.top])} for t in tokens]
        offsets = []
        for text in texts:  # each token's start in the answer, continued across streamed chunks
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_entry(self, t: Token) -> dict:
        text, raw = token_text(self.tokenizer, t.id)
        top = []
        for i, lp in zip(t.top_ids[:self.top], t.top_logprobs[:self.top]):
            alt, alt_raw = token_text(self.tokenizer, int(i))
            top.append({"token": alt, "logprob": float(lp), "bytes": alt_raw})
        return {"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": top}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"

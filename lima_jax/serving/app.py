"""The ASGI app (FastAPI) that speaks OpenAI's API over an Engine.

Routes: POST /v1/chat/completions (LIMA's format), POST /v1/completions (raw text after BOS, or
token ids, for base models and lm-evaluation-harness), GET /v1/models, GET /health, GET /metrics
(Prometheus), and vLLM's tokenizer routes that lm-evaluation-harness's `local-completions`
detects and uses (POST /tokenize, POST /detokenize, GET /tokenizer_info). Streaming answers are
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Every refused request
gets a 400 (401 without the API key, 404 for an unknown route, 413 for a body over the limit)
with OpenAI's error body {"error": {"message", "type", "param", "code"}}.

Tokenizing and rendering long logprobs run in threads, never on the event loop; a client that
disconnects, streaming or not, has its requests cancelled (guards.py).
"""

import asyncio
import dataclasses
import secrets
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.exceptions import HTTPException

from lima_jax.data import chat_format
from lima_jax.sampling.decode import Request
from lima_jax.serving.completion import Choice, Completion
from lima_jax.serving.engine import Engine
from lima_jax.serving.guards import Guard, error_body, unless_disconnected
from lima_jax.serving.metrics import ServerMetrics
from lima_jax.serving.protocol import (
    ChatRequest,
    CompletionRequest,
    InvalidRequest,
    Text,
    TokenIds,
    _Body,
    chat_turns,
    settings_of,
)

MAX_BODY_BYTES = 8 << 20  # serve.py's --max_body_mb default: a whole context of text many times over
CLIENT_GONE = 499  # the status logged for a request whose client left (nginx's)


class TokenizeRequest(_Body):
    prompt: Text
    add_special_tokens: bool = True  # BOS first, as a text prompt of /v1/completions
    model: Text = ""


class DetokenizeRequest(_Body):
    tokens: TokenIds | list[int] = Field(default_factory=list)
    model: Text = ""


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="lima_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_name = engine, model_name
    metrics = ServerMetrics(engine)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, on_response=metrics.on_response)
    created = int(time.time())
    tokenizer = engine.sampler.tokenizer

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return JSONResponse(error_body(f"{first.get('msg', 'invalid request')} ({'.'.join(loc) or 'body'})", 400,
                                       ".".join(loc) or None), 400)

    @app.exception_handler(InvalidRequest)
    async def _refused(request, exc: InvalidRequest):
        return JSONResponse(error_body(str(exc), 400, exc.param, exc.code), 400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), exc.status_code), exc.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "slots": engine.num_slots, "active": engine.active,
                "peak_active": engine.peak_active, "steps": engine.steps, "prefix_cache": engine.prefix_cache_stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lima_jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        sampler = engine.sampler
        system, turns = chat_turns(body.messages, chat_format.HAS_SYSTEM.get(sampler.chat_format, False))
        try:
            prompt = await asyncio.to_thread(sampler.prompt_ids, turns, None, system)
        except ValueError as e:  # a base model has no EOT to end turns with
            raise InvalidRequest(f"{e}; use /v1/completions", "messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await answer(http, body, [prompt], [None], max_tokens, top, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        if body.max_tokens == 0 and not body.echo:
            raise InvalidRequest("max_tokens=0 generates nothing: with echo=true it scores the prompt", "max_tokens")
        texts = body.prompts()
        prompts = await asyncio.to_thread(lambda: [engine.sampler.prompt_ids(p, "raw") if isinstance(p, str)
                                                   else list(p) for p in texts])
        for prompt in prompts:
            check_token_ids(prompt, engine.cfg.vocab_size, "prompt")
        echoes = [(p if isinstance(p, str) else await asyncio.to_thread(tokenizer.decode, p)) if body.echo else None
                  for p in texts]
        return await answer(http, body, prompts, echoes, body.max_tokens, body.logprobs, chat=False)

    async def answer(http: HTTPRequest, body, prompts: list[list[int]], echoes: list[str | None],
                     max_tokens: int | None, top: int | None, chat: bool):
        """The response to `prompts`, each answered `body.n` times."""
        arrived = time.monotonic()
        if body.n > engine.num_slots:
            raise InvalidRequest(f"n={body.n}, but this server decodes at most {engine.num_slots} answers at once "
                                 "(its --slots): ask for fewer, or send several requests", "n")
        settings = settings_of(body)
        check_token_ids([t for t, _ in settings["logit_bias"]], engine.cfg.vocab_size, "logit_bias")
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        choices = []
        for i, (prompt, echo) in enumerate(zip(prompts, echoes)):
            request = Request(tuple(prompt), request_length(engine, prompt, max_tokens, echo is not None, chat),
                              seed=seed, **settings)
            for j in range(body.n):  # choice j draws stream j of the seed: choice 0 is the n=1 answer
                choices.append(Choice(engine, dataclasses.replace(request, row=j), i * body.n + j,
                                      body.stop_strings(), echo,
                                      lambda: metrics.first_token.observe(time.monotonic() - arrived)))
        completion = Completion(engine, choices, body, top, model_name, chat)
        if body.stream:
            return StreamingResponse(counted(completion.chunks(), completion, metrics), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        whole = await unless_disconnected(http, completion.complete())
        if whole is None:
            return Response(status_code=CLIENT_GONE)
        count_tokens(metrics, whole["usage"])
        return JSONResponse(whole)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        ids = await asyncio.to_thread(special_or_encoded, tokenizer, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.cfg.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_token_ids(body.tokens, engine.cfg.vocab_size, "tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        name = lambda i: None if i is None else tokenizer.token_text(i)[0]  # noqa: E731
        return {"tokenizer_class": tokenizer.kind, "bos_token": name(tokenizer.bos_id),
                "eos_token": name(tokenizer.eos_id), "pad_token": None, "model_max_length": engine.cfg.max_seq_len}

    return app


def request_length(engine: Engine, prompt: list[int], max_tokens: int | None, echo: bool, chat: bool) -> int:
    """The engine request's max_tokens: the asked number, cut to what the context still holds
    (all of it by default), or InvalidRequest for a prompt the context cannot hold."""
    limit = engine.cfg.max_seq_len
    longest = limit if max_tokens == 0 and echo else limit - 1  # scoring alone takes the whole context
    if len(prompt) > longest:
        raise InvalidRequest(f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens "
                             f"(max_seq_len), so a prompt may have at most {limit - 1}"
                             f"{f' ({limit} to only score it: max_tokens 0 and echo)' if not chat else ''}",
                             "messages" if chat else "prompt", "context_length_exceeded")
    room = limit - len(prompt)
    return 0 if max_tokens == 0 else min(max_tokens or room, room)


def check_token_ids(ids, vocab_size: int, param: str) -> None:
    for token in ids:
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"{param}: token {token} is outside the vocabulary (0..{vocab_size - 1})", param)


def special_or_encoded(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """/tokenize: a special token's own name (BOS, EOS, EOT) is that token, as lm-evaluation-
    harness expects when it asks for its EOS id; other text is encoded."""
    special = {tokenizer.token_text(i)[0]: i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eot_id)
               if i is not None}
    ids = [special[text]] if text in special else tokenizer.encode(text)
    return ([tokenizer.bos_id] if add_special_tokens and tokenizer.bos_id is not None else []) + ids


async def counted(chunks, completion: Completion, metrics: ServerMetrics):
    """The stream's chunks; its tokens count in the metrics once it ends."""
    async for chunk in chunks:
        yield chunk
    count_tokens(metrics, completion.usage())


def count_tokens(metrics: ServerMetrics, usage: dict) -> None:
    metrics.prompt_tokens.inc(usage["prompt_tokens"])
    metrics.completion_tokens.inc(usage["completion_tokens"])

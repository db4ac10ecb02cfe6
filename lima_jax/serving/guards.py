"""What stands between the network and the routes (one ASGI middleware, `Guard`): the API key,
the body size limit, and a last catch for internal errors; plus `unless_disconnected`, which
stops a non-streaming request's work when its client goes away.

The body is read here, up to the limit, before the app sees it (413 past it, without reading the
rest). An internal error becomes a 500 with OpenAI's error body and is not re-raised: Starlette's
own last handler re-raises, and uvicorn then drops the connection, so a keep-alive client's next
request saw "connection reset".
"""

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers, liveness probes)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Guard:
    """ASGI middleware: `api_key` (None: none needed) as `Authorization: Bearer KEY` on every
    path but OPEN_PATHS (401); bodies of at most `max_body_bytes` (413); `on_response(path,
    status)` after each HTTP request (the metrics)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int,
                 on_response: Callable[[str, int], None] = lambda path, status: None):
        self.app, self.max_body_bytes, self.on_response = app, max_body_bytes, on_response
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started = 500, False

        async def send_status(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            if self.expected is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                return await reply(send_status, 401, error_body(
                    "a valid API key is needed: send 'Authorization: Bearer KEY' (the server's --api_key_env)",
                    401, code="invalid_api_key"))
            body = await read_body(scope, receive, self.max_body_bytes)
            if body is None:
                return await reply(send_status, 413, error_body(
                    f"the request body is over this server's limit of {self.max_body_bytes} bytes (--max_body_mb)",
                    413, code="request_too_large"))
            await self.app(scope, replay(body, receive), send_status)
        except Exception as e:
            log.exception("%s %s failed", scope.get("method"), scope["path"])
            if not started:  # a started response cannot change its status
                await reply(send_status, 500, error_body(f"{type(e).__name__}: {e}", 500))
        finally:
            self.on_response(scope["path"], status)

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return secrets.compare_digest(given, self.expected)


async def read_body(scope, receive, limit: int) -> bytes | None:
    """The whole request body, or None once it is over `limit` bytes (the rest left unread)."""
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left before sending it all
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive that gives the app `body` first, then whatever the client sends (its disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def reply(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def unless_disconnected(request, work: Awaitable):
    """`work`'s result, or None once the client has gone away (`work` is then cancelled, which
    cancels its engine requests: a client that gives up frees its slots within a step)."""
    async def until_disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None

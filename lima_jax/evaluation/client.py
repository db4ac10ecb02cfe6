"""Asking the judge: chat completions through the official `openai` client, many at once (up to
`concurrency`), each retried with exponential backoff on 429, 5xx and lost connections, each
answered from the disk cache when it can be, with a progress bar. The same client asks a
baseline model for its answers (`sample.py --endpoint`, lima_jax/sampling/endpoint.py), with
its own request parameters per conversation.

The retries are ours, not the client's (it is built with `max_retries=0`), so the policy is one
place: `max_attempts` tries, waits of `backoff_s * 2**k` (with jitter, at most `max_backoff_s`,
longer if the server's Retry-After asks), then a clear error; the replies received so far stay
in the cache, so rerunning the same command resumes."""

import concurrent.futures
import dataclasses
import random
import threading
import time
import typing
from collections.abc import Mapping, Sequence

import openai
import pydantic
import tqdm
from openai.types.chat import ChatCompletion

from lima_jax.evaluation.cache import ReplyCache, cache_key

Messages = list[dict[str, str]]


class JudgeError(ValueError):
    """The judge could not be asked: a refused request, or retries exhausted."""


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    url: str
    model: str
    api_key: str = "EMPTY"  # a local server needs none, the client needs some string
    temperature: float = 0.0  # greedy: a verdict must not depend on a sampling seed
    max_tokens: int = 4  # the verdict is one character; a few more let the text be read when logprobs are absent
    logprobs: bool = True  # ask for token log-probabilities (the verdict as a probability, as AlpacaEval does)
    top_logprobs: int = 20  # OpenAI's maximum
    concurrency: int = 8
    max_attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 300.0
    role: str = "judge"  # who is asked, in error messages ("the judge at URL failed ...")

    def request_params(self) -> dict:
        """What, besides model and messages, decides a reply: part of the cache key."""
        params: dict = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.logprobs:
            params.update(logprobs=True, top_logprobs=self.top_logprobs)
        return params


def retryable(status: int) -> bool:
    """Rate limits and server errors pass; a request the server refuses (4xx) will be refused again."""
    return status == 429 or status >= 500


def backoff_seconds(attempt: int, settings: JudgeSettings, retry_after: float | None = None,
                    rng: random.Random | None = None) -> float:
    """The wait before try `attempt + 1`: doubling from `backoff_s`, jittered to 50-100% so that
    concurrent requests do not retry in lockstep, at least what Retry-After asks, at most `max_backoff_s`."""
    wait = settings.backoff_s * 2 ** (attempt - 1) * (0.5 + 0.5 * (rng or random).random())
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, settings.max_backoff_s)


class Judge:
    """Sends chat requests to one judge model; `sent` counts requests that went out (retries
    included), `from_cache` the replies the cache gave."""

    def __init__(self, settings: JudgeSettings, cache: ReplyCache, progress: bool = True):
        self.settings, self.cache, self.progress = settings, cache, progress
        self.client = openai.OpenAI(base_url=settings.url, api_key=settings.api_key, max_retries=0,
                                    timeout=settings.timeout_s)
        build_models(ChatCompletion)
        self.sent = self.from_cache = self.retries = 0
        self._count_lock = threading.Lock()

    def ask_all(self, conversations: Sequence[Messages], desc: str = "judging",
                params: Sequence[dict] | None = None) -> list[dict]:
        """The reply to each conversation, in order; identical requests are sent once. `params`:
        each conversation's request parameters (default: the settings' `request_params()` for all)."""
        params = [self.settings.request_params()] * len(conversations) if params is None else list(params)
        keys = [cache_key(self.settings.model, messages, p) for messages, p in zip(conversations, params, strict=True)]
        todo = {key: (messages, p) for key, messages, p in zip(keys, conversations, params) if key not in self.cache}
        unique = len(set(keys))
        self.from_cache += unique - len(todo)
        with tqdm.tqdm(total=unique, initial=unique - len(todo), desc=desc, unit="req", disable=not self.progress,
                       dynamic_ncols=True) as bar:
            self._run(todo, bar)
        return [self.cache.get(key) for key in keys]

    def _run(self, todo: Mapping[str, tuple[Messages, dict]], bar: tqdm.tqdm) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.settings.concurrency)
        futures = {pool.submit(self.ask, messages, p): (key, p) for key, (messages, p) in todo.items()}

        def keep(future):
            key, p = futures[future]
            self.cache.put(key, future.result(), {"model": self.settings.model, "params": p})

        try:
            for future in concurrent.futures.as_completed(futures):
                keep(future)
                bar.update(1)
        except JudgeError as e:
            pool.shutdown(wait=True, cancel_futures=True)
            for future, (key, _) in futures.items():  # replies that arrived meanwhile are kept for the rerun
                if future.done() and not future.cancelled() and future.exception() is None and key not in self.cache:
                    keep(future)
            raise JudgeError(f"{e}\n  {len(self.cache)} replies are cached in {self.cache.path}: rerun the same "
                             f"command to resume") from None
        finally:
            pool.shutdown(wait=True)

    def ask(self, messages: Messages, params: dict | None = None) -> dict:
        """One request, retried; the reply as a plain dict (see `reply_dict`). `params`: the
        request parameters (default: the settings'); unknown to OpenAI's API, they go in the body as-is."""
        s = self.settings
        params = s.request_params() if params is None else params
        known, extra = _split_params(params)
        for attempt in range(1, s.max_attempts + 1):
            try:
                self._count("sent")
                response = self.client.chat.completions.create(model=s.model, messages=messages, **known,
                                                               **({"extra_body": extra} if extra else {}))
                return reply_dict(response)
            except openai.APIStatusError as e:
                error, retry_after = f"HTTP {e.status_code}: {_short(e)}", _retry_after(e)
                if not retryable(e.status_code):
                    raise JudgeError(f"the {s.role} at {s.url} refused the request ({error}); check its URL, "
                                     f"the model name and the API key" + _logprobs_hint(e, s)) from None
            except openai.APIConnectionError as e:  # also timeouts
                error, retry_after = f"{type(e).__name__}: {_short(e)}", None
            if attempt == s.max_attempts:
                raise JudgeError(f"the {s.role} at {s.url} failed {attempt} times, last: {error}")
            self._count("retries")
            time.sleep(backoff_seconds(attempt, s, retry_after))
        raise AssertionError("unreachable")

    def _count(self, name: str) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + 1)


def reply_dict(response) -> dict:
    """What a verdict is read from: the text and, when returned, each generated token with its
    log-probability and the top alternatives (`top`: [[token, logprob], ...])."""
    if not response.choices:
        raise JudgeError("the judge returned no choices")
    choice = response.choices[0]
    content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
    tokens = None
    if content:
        tokens = [{"token": t.token, "logprob": t.logprob, "top": [[a.token, a.logprob] for a in (t.top_logprobs or [])]}
                  for t in content]
    usage = response.usage
    usage = None if usage is None else {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    return {"text": choice.message.content or "", "tokens": tokens, "finish_reason": choice.finish_reason,
            "usage": usage}


# Chat-completion parameters of OpenAI's API; others (repetition_penalty, top_k) are extensions
# that servers such as ours and vLLM read from the body.
OPENAI_PARAMS = frozenset({"temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "logprobs",
                           "top_logprobs", "stop", "n", "presence_penalty", "frequency_penalty", "logit_bias"})


def _split_params(params: Mapping[str, object]) -> tuple[dict, dict]:
    known = {k: v for k, v in params.items() if k in OPENAI_PARAMS}
    return known, {k: v for k, v in params.items() if k not in OPENAI_PARAMS}


def build_models(model: type[pydantic.BaseModel], built: set | None = None) -> None:
    """Builds `model` and every model its fields hold, now, in this thread. openai defers building its
    reply models to first use, and pydantic's deferred build is not thread-safe: worker threads parsing
    their first replies at once failed with "BaseModel cannot be instantiated directly" (a CI run)."""
    built = set() if built is None else built
    if model in built:
        return
    built.add(model)
    model.model_rebuild()
    annotations = [field.annotation for field in model.model_fields.values()]
    while annotations:
        annotation = annotations.pop()
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            build_models(annotation, built)
        else:  # list[X], X | None, Optional[...]: look inside
            annotations.extend(typing.get_args(annotation))


def _retry_after(e: openai.APIStatusError) -> float | None:
    try:
        return float(e.response.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def _short(e: Exception) -> str:
    text = str(e).strip().split("\n", 1)[0]
    return text[:300]


def _logprobs_hint(e: openai.APIStatusError, s: JudgeSettings) -> str:
    return "; if the endpoint does not support logprobs, pass --nologprobs" if s.logprobs and "logprob" in str(e) else ""

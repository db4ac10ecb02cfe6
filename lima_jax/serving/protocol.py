"""The OpenAI request bodies the server accepts (pydantic), and their translation into LIMA:
turns in LIMA's format, decoding settings, an engine Request.

Unknown fields are refused, as OpenAI refuses them; fields OpenAI clients commonly send
with their neutral value (presence/frequency penalty 0, user, ...) are accepted. Text must be
valid Unicode (a lone surrogate such as "\ud800" is refused: it has no UTF-8 form to tokenize).

Completions (what lm-evaluation-harness sends): `prompt` is a text, token ids, or a list of
either (one choice per prompt, times `n`); token ids are fed as they are (no BOS added), text
after BOS. `echo` with `logprobs` returns the prompt's tokens with their log-probabilities
(the first's null: nothing precedes it), and `max_tokens: 0` with `echo` only scores.
Decoding: LIMA's (top_p 0.9, temperature 0.7, repetition penalty 1.2 on generated tokens)
unless set; `temperature: 0` means greedy. `repetition_penalty` is an extension (the
openai client sends it through `extra_body`). `logit_bias` is added to the logits before
the penalty; logprobs are the model's own (log-softmax before any transform).

Messages: user and assistant turns, alternating, starting and ending with the user; one
leading `system` message where the checkpoint's chat format has a system role (`llama3`,
`chatml`); `lima` has none, so there it is refused (the Hugging Face export's chat template
refuses it too): put instructions in the first user message.
"""

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from lima_jax.sampling.decoding import LIMA

MAX_STOP = 16  # OpenAI takes 4; lm-evaluation-harness sends a task's `until` strings and its EOS string
MAX_N = 128  # choices per request; the server also holds n to its slot count
TOKEN_ID = re.compile(r"-?[0-9]{1,10}")  # ASCII digits only: "²".isdigit() is True, int("²") fails


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode ({e.reason} at character {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class InvalidRequest(ValueError):
    """A request the server refuses with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: Text = ""  # one model per server: any name is accepted
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1  # choice i draws stream i of the seed (decode.Request.row)
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**32)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None  # LIMA's extension
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    user: Text | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[Message]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Sampling):
    prompt: Text | TokenIds | Annotated[list[Text] | list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: score the prompt (with echo)
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: None = None

    def prompts(self) -> list[str | list[int]]:
        """One text or token-id list per prompt."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


def chat_turns(messages: list[Message], allow_system: bool = False) -> tuple[str | None, list[str]]:
    """(system message or None, turns) from OpenAI messages, or InvalidRequest. `allow_system`:
    the chat format has a system role (one, first)."""
    start = int(allow_system and bool(messages) and messages[0].role == "system")
    if len(messages) == start:
        raise InvalidRequest("messages is empty: send at least one user message", "messages")
    for i, message in enumerate(messages[start:], start):
        if message.role == "system":
            raise InvalidRequest("a system message is allowed only first" if allow_system else
                                 "this model's chat format has no system role (LIMA's alternates user and assistant "
                                 "turns): put the instructions in the first user message", f"messages[{i}].role")
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message.role != expected:
            raise InvalidRequest(f"messages[{i}] is {message.role!r} but the turns alternate user and assistant, "
                                 f"starting with user: expected {expected!r}", f"messages[{i}].role")
    if messages[-1].role != "user":
        raise InvalidRequest("the last message must be the user's (the model answers it)", "messages")
    return (messages[0].text() if start else None), [m.text() for m in messages[start:]]


def settings_of(body: _Sampling) -> dict:
    """The engine Request's decoding fields (LIMA's defaults), without prompt and max_tokens."""
    greedy = body.temperature == 0
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not TOKEN_ID.fullmatch(key):
            raise InvalidRequest(f"logit_bias key {key!r} is not a token id", "logit_bias")
        bias.append((int(key), float(value)))
    return dict(temperature=LIMA.temperature if body.temperature in (None, 0) else body.temperature,
                top_p=LIMA.top_p if body.top_p is None else body.top_p,
                repetition_penalty=LIMA.repetition_penalty if body.repetition_penalty is None
                else body.repetition_penalty,
                greedy=greedy, logit_bias=tuple(bias))

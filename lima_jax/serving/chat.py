"""A terminal chat with a checkpoint, in-process (no server): each answer streams as it is
decoded, the conversation so far is the next prompt (in the checkpoint's chat format, after
the system message if one is given), `/reset` forgets it, `/exit` (or end of input) leaves.

Answers come from Sampler.answer, so they are `launch/sample.py`'s for the same turns and
settings; turn k of a conversation is drawn with seed `seed + k`.
"""

import sys
from collections.abc import Callable
from typing import TextIO

from lima_jax.sampling.decoding import SamplingSettings
from lima_jax.sampling.sampler import Sampler

HELP = "/reset forgets the conversation, /exit leaves"


class Conversation:
    """The turns so far, and the settings that answer the next one."""

    def __init__(self, sampler: Sampler, settings: SamplingSettings, seed: int = 0, system: str | None = None):
        self.sampler, self.settings, self.seed, self.system = sampler, settings, seed, system
        self.sampler.prompt_ids("", system=system)  # a base model, or a system message in LIMA's format: refused now
        self.turns: list[str] = []

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.turns = []

    def reply(self, message: str, stream: Callable[[str], None] | None = None) -> dict:
        """Answer `message` after the turns so far; both join the history."""
        turns = self.turns + [message]
        room = self.sampler.cfg.max_seq_len - len(self.sampler.prompt_ids(turns, system=self.system))
        if room < 1:
            raise ValueError(f"the conversation no longer fits the model's {self.sampler.cfg.max_seq_len} tokens: "
                             "/reset to start over")
        settings = self.settings
        if settings.max_new_tokens > room:  # never past the positions the model was trained on
            settings = type(settings)(**dict(settings.as_dict(), max_new_tokens=room))
        out = self.sampler.answer(turns, settings, self.seed + len(self.turns) // 2, stream=stream, system=self.system)
        self.turns = turns + [out["answer"]]
        return out


def chat_loop(conversation: Conversation, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read messages until /exit or end of input; print each answer as it streams."""
    write = lambda text: (out.write(text), out.flush())  # noqa: E731
    write(f"[{HELP}]\n")
    while True:
        try:
            message = read("you> ").strip()
        except EOFError:
            write("\n")
            return
        if message in ("/exit", "/quit"):
            return
        if message == "/reset":
            conversation.reset()
            write("[conversation reset]\n")
        elif message.startswith("/"):
            write(f"[unknown command {message}: {HELP}]\n")
        elif message:
            write("lima> ")
            try:
                conversation.reply(message, stream=write)
            except ValueError as e:
                write(f"[{e}]")
            write("\n")

"""From generated token ids to the text a reader sees: the one streaming detokenizer (sample.py
--prompt, the chat, the server's SSE), stop strings, and the per-token text of logprobs.

SentencePiece decodes a piece with its context (a leading space, bytes of one character
split over byte-fallback pieces), so the whole answer is decoded each time and only a
settled suffix is released: never a trailing replacement character (an incomplete UTF-8
sequence) and never the start of a possible stop string. The pieces released, joined, are
exactly the final text.
"""

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids with `add`; each call returns the new text that is safe to send.
    `stopped` turns True when a stop string appears (the text is cut before it)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the answer so far, cut at a stop string once one appears
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = self._stop_at()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._release(len(self.text))
        return self._release(self._settled())

    def finish(self) -> str:
        """The rest of the text once the answer has ended."""
        return self._release(len(self.text))

    def _stop_at(self) -> int | None:
        found = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _settled(self) -> int:
        """Characters that no later token can change into (the start of) a stop string."""
        end = len(self.text.rstrip(REPLACEMENT))
        for s in self.stop:  # hold back a tail that could be the beginning of a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if self.text[end - k:end] == s[:k]:
                    end -= k
                    break
        return end

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """(text, UTF-8 bytes) of one token for logprobs (`Tokenizer.token_text`): a piece's text, a
    byte-fallback piece's byte; EOT, other special tokens and ids past the vocabulary are named."""
    return tokenizer.token_text(token)

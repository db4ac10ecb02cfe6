"""Expected failures: every error a user can cause and fix derives from `LimaError`, whose `kind`
is the headline `cli` prints ("bad data", "resume refused", ...) and whose `todo` says what to do.
`cli` recognises them by class, not by name, and prints one short message instead of a traceback.

This module imports nothing, so every layer (storage, data, checkpoint, model store, train) may
raise these without an import cycle.
"""


class LimaError(Exception):
    """An expected failure. Subclasses set `kind`; an instance may carry its own `todo`."""

    kind = "error"
    todo = ""

    def __init__(self, message: str = "", *, todo: str | None = None):
        super().__init__(message)
        if todo is not None:
            self.todo = todo


class ConfigError(LimaError, ValueError):
    """A config value that cannot work; the message names the key (`config.data.seq_len=...`)."""

    kind = "bad config or input"


class DataError(LimaError, ValueError):
    """Malformed input data; the message starts with `file:line:` (or `file:row N:`)."""

    kind = "bad data"
    todo = "fix that record of the data file"


class ConversionError(LimaError, ValueError):
    """A conversion or export that is refused (unsupported model, unsafe output location)."""

    kind = "conversion refused"


class ResumeRefused(LimaError, ValueError):
    """A resumed run whose run-defining config differs from its checkpoint's."""

    kind = "resume refused"


class NonFiniteLoss(LimaError, RuntimeError):
    """Training produced a NaN/inf loss; the message names the checkpoint a rerun resumes from."""

    kind = "training stopped"


class DamagedCheckpoint(LimaError, ValueError):
    """A checkpoint step that does not restore, fails its fingerprints or holds non-finite values."""

    kind = "damaged checkpoint"


class LoraBaseChanged(LimaError, ValueError):
    """A LoRA checkpoint whose base checkpoint no longer holds the weights its adapters were
    trained on (another model copied over it), or no longer restores."""

    kind = "LoRA base refused"
    todo = "restore the base the adapters were trained on (or retrain the adapters on the new one)"

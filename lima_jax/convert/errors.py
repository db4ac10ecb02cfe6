"""The converter's one expected-failure type."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as it is; the message says which file and why."""

"""The converter's expected-failure type, defined with every other one in lima_jax.errors."""

from lima_jax.errors import ConversionError

__all__ = ["ConversionError"]

"""User-facing errors.

Two kinds of failure exist in dbrxq:
- internal invariants are checked with ``assert`` and carry the offending values;
- anything a user can cause (a bad config, a broken checkpoint, a wrong option) raises a
  subclass of :class:`DbrxqError` whose message is one line naming the file, tensor or option
  and what was expected. The CLI prints that line and exits with status 2, no traceback.
"""


class DbrxqError(Exception):
    """Base class of every error a user can cause."""


class ConfigError(DbrxqError, ValueError):
    """A config.json (or quantization_config) field is missing or unusable."""


class CheckpointError(DbrxqError):
    """A checkpoint file or tensor is missing, truncated, misshapen or not safetensors."""


class TokenizerError(DbrxqError):
    """The tokenizer vocabulary cannot be found or read."""


class QuantizationError(DbrxqError, ValueError):
    """Unsupported quantization settings, or quantized tensors that do not fit their spec."""


class GenerationError(DbrxqError, ValueError):
    """A generation request that cannot be served (e.g. prompt + max_new_tokens > context)."""


class BudgetError(ConfigError):
    """A memory budget that cannot be parsed, or that is too small for what must be resident."""

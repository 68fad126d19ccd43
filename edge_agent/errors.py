"""The error tree. Transient failures are a type, never a string match."""


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """The configuration is invalid. `field` names the offending key, `hint` says how to fix it."""

    def __init__(self, field: str, message: str, hint: str = "") -> None:
        self.field = field
        self.message = message
        self.hint = hint
        super().__init__(f"{field}: {message}" + (f" (fix: {hint})" if hint else ""))


class ModelError(EdgeAgentError):
    """A model could not be built, verified or loaded."""


class OutboxError(EdgeAgentError):
    """The durable outbox could not be opened or written."""


class DecodeError(EdgeAgentError):
    """An inbound payload cannot be turned into a note; `reason` goes into the dead-letter record."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TransientError(EdgeAgentError):
    """A failure worth retrying (broker unreachable, database locked)."""


class InputError(EdgeAgentError):
    """What a command was handed is unusable (an examples file with a bad row, nothing to learn from)."""

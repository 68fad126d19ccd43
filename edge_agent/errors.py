"""The error tree. Transient failures are a type, never a string match."""

from enum import StrEnum


class DeadLetterKind(StrEnum):
    """Why a message became a dead letter: a closed set, made where the dead letter is made. Metrics label by
    it (bounded cardinality whatever producers send); the human `reason` next to it carries the details."""

    TOO_LARGE = "too_large"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    TOO_DEEP = "too_deep"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY = "empty"
    NO_ROUTE = "no_route"
    RATE_LIMITED = "rate_limited"
    TOPIC_TOO_LONG = "topic_too_long"
    BAD_SPARKPLUG = "bad_sparkplug"
    TASK_FAILED = "task_failed"  # a task raised on this note (alone, not only in a batch)
    BAD_OUTPUT = "bad_output"  # the result could not be serialised (a task returned NaN or a non-JSON type)
    RESULT_TOO_LARGE = "result_too_large"  # over pipeline.max_result_bytes
    PACKET_TOO_LARGE = "packet_too_large"  # a stored row over the uplink's Maximum Packet Size (made by the sink)
    BAD_FEEDBACK = "bad_feedback"  # a correction that does not fit (unknown task or result, label, span)
    BAD_REQUEST = "bad_request"  # a digest request that is not {"from", "to"[, "request_id"]}
    INTERNAL = "internal"  # any other exception while handling this one message: a bug of ours, isolated


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
    """An inbound payload cannot be turned into a note; `kind` and `reason` go into the dead-letter record."""

    def __init__(self, kind: DeadLetterKind, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(reason)


class TransientError(EdgeAgentError):
    """A failure worth retrying (broker unreachable, database locked)."""


class InputError(EdgeAgentError):
    """What a command was handed is unusable (an examples file with a bad row, nothing to learn from)."""

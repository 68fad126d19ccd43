"""What flows between the stages: an Inbound MQTT message (source → pipeline) and a decoded Note (pipeline → tasks).

Both sit below every stage, so the pipeline needs neither the source nor the task registry to name them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message as paho delivered it; `mid` is what the source acks once its result is committed."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float


@dataclass(frozen=True, slots=True)
class Note:
    """One decoded inbound message, ready for the tasks."""

    text: str
    topic: str
    input_id: str | None = None
    received_at: float = 0.0

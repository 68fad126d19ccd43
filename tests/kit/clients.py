"""Real paho clients on the plant's side of the agent: a consumer that records, a producer that sends."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


class Collector:
    """Subscribes (persistent session, QoS 1) and records every message: what a plant consumer does."""

    def __init__(self, port: int, topic: str = "#", client_id: str | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"collector-{port}-{id(self)}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def json(self, prefix: str = "") -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, retained in self.messages if t.startswith(prefix) and not retained]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    """Publishes QoS 1 (MQTT 5), by default waiting for each PUBACK."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"publisher-{port}-{id(self)}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, wait: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if wait:
            info.wait_for_publish(timeout=10)

    def note(self, topic: str, i: int, text: str | None = None) -> None:
        self.publish(topic, json.dumps({"id": f"n{i}", "text": text or f"P-{100 + i % 50} at {i % 90} bar"}))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

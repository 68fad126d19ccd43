"""Building paho clients the same way for source and sink: protocol, TLS, credentials, limits.

paho traps handled here, once: `max_*_set` must be called before `connect()`; MQTT 5 session
persistence is `clean_start=False` on *every* connect (paho's default only keeps the first one clean),
while 3.1.1 spells it `clean_session=False` in the constructor. `name` ("source" or "sink") names the
connection in errors and logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import BrokerConfig, Config
from .credentials import password
from .tls import tls_context

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


def make_client(
    cfg: BrokerConfig,
    client_id: str,
    *,
    name: str,
    persistent: bool,
    manual_ack: bool = False,
    inflight: int = 20,
    will: Will | None = None,
) -> mqtt.Client:
    v5 = cfg.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    client.enable_logger(logging.getLogger("paho"))
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)  # unbounded: our own window keeps paho's queue small
    client.reconnect_delay_set(cfg.reconnect_min_delay, cfg.reconnect_max_delay)
    # paho calls this after each failed attempt (refused, unreachable, TLS) and retries with back-off; its own
    # log line for it is an error without the address (filtered in edge_agent.logs).
    client.on_connect_fail = lambda _client, _userdata: log.warning(
        f"{name}.unreachable", host=cfg.host, port=cfg.port,
        retry=f"with back-off, {cfg.reconnect_min_delay:g} to {cfg.reconnect_max_delay:g} s")
    if cfg.username is not None:
        client.username_pw_set(cfg.username, password(cfg, name))
    if cfg.tls is not None:
        client.tls_set_context(tls_context(cfg, name))
    if will is not None:
        client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
    return client


STABLE_AFTER_S = 60.0  # a connection up this long was a real one: the next loss retries at the minimum delay


class ReconnectBackoff:
    """Back-off across connections that the broker accepts and then drops at once.

    paho doubles its delay only across failed attempts and resets it at every successful CONNACK, so a broker
    that sends CONNACK and closes (a quota, a packet-size limit, a client-id takeover, a proxy) is retried
    every `reconnect_min_delay` forever. Each connection that stayed up less than STABLE_AFTER_S doubles the
    delay paho starts from (capped at `reconnect_max_delay`); one that stayed up longer resets it.
    Call `connected()` from on_connect (success) and `disconnected()` from on_disconnect.
    """

    def __init__(self, client: mqtt.Client, cfg: BrokerConfig, name: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client, self._cfg, self._name, self._clock = client, cfg, name, clock
        self.delay = cfg.reconnect_min_delay
        self._up_since: float | None = None

    def connected(self) -> None:
        self._up_since = self._clock()

    def disconnected(self) -> float:
        """The delay paho waits before the next attempt (set on the client)."""
        if self._up_since is None:
            return self.delay  # not up since the last loss: paho's own doubling applies
        up_for, self._up_since = self._clock() - self._up_since, None
        if up_for >= STABLE_AFTER_S:
            self.delay = self._cfg.reconnect_min_delay
        else:
            self.delay = min(self.delay * 2, self._cfg.reconnect_max_delay)
            log.warning(f"{self._name}.unstable", host=self._cfg.host, port=self._cfg.port, up_for_s=round(up_for, 3),
                        retry_in_s=self.delay, hint="the broker accepted us and dropped the connection: see its log")
        self._client.reconnect_delay_set(self.delay, self._cfg.reconnect_max_delay)
        return self.delay


def connect_async(
    client: mqtt.Client, cfg: BrokerConfig, *, persistent: bool, receive_maximum: int | None = None
) -> None:
    """Start connecting in the background; paho's loop retries with backoff until stopped."""
    if cfg.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = cfg.session_expiry
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        client.connect_async(cfg.host, cfg.port, cfg.keepalive, clean_start=not persistent, properties=props)
    else:
        client.connect_async(cfg.host, cfg.port, cfg.keepalive)


def refused_hint(name: str, reason_code: object) -> str:
    """The likely fix for a CONNECT the broker refused (MQTT 5 reason codes; paho maps 3.1.1 onto them)."""
    value = getattr(reason_code, "value", None)
    if value in (0x86, 0x87):  # bad user name or password, not authorized
        return f"check {name}.username and its password (password_file or password_credential), and the broker's ACL"
    if value == 0x85:
        return f"set {name}.client_id to one the broker accepts"
    return "see the broker's log"


def is_failure(reason_code: object) -> bool:
    """A v5 reason code >= 0x80 is a failure. 16 ("No matching subscribers") is a success."""
    is_fail = getattr(reason_code, "is_failure", None)
    return bool(is_fail) if is_fail is not None else False


def preflight(cfg: Config, *, credentials: bool = True) -> None:
    """Read every password and load every TLS file now, so a bad path fails at start naming its key.

    `credentials=False` skips systemd credentials (check-config run by hand, outside the service).
    """
    for name, broker in (("source", cfg.source), ("sink", cfg.sink)):
        if broker.username is not None and (credentials or broker.password_credential is None):
            password(broker, name)
        if broker.tls is not None:
            tls_context(broker, name)

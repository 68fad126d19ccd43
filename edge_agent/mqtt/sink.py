"""The sink: publishes outbox rows to the uplink broker, QoS 1, and deletes a row only after PUBACK.

Two lanes, each in commit order:
- live: rows committed since the current connection came up, published as fast as the window allows;
- backlog: rows that were waiting when the connection came up (an outage, or a restart), replayed
  through a token bucket so a 50k backlog cannot starve live results or the gateway's CPU, and
  published with `"replayed": true`.
Rows handed to paho stay in paho's session until PUBACKed: paho re-sends them itself after a reconnect,
so the dispatcher never sends a row twice within one process. A crash loses only paho's RAM copy; the
rows are still in the outbox and go out as backlog on the next start.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog

from .. import __version__
from ..config import SinkConfig
from ..errors import DeadLetterKind, OutboxError
from ..outbox.store import Outbox, Record
from ..ratelimit import TokenBucket
from ..results import deadletter_payload, mark_replayed, result_id
from .client import ReconnectBackoff, Will, connect_async, is_failure, make_client, refused_hint

log = structlog.get_logger(__name__)

RETRY_DELAY_S = 5.0
ACCEPT_WITHIN_S = 0.2  # PUBACKed rows are deleted at the latest this long after their PUBACK
# MQTT 3.1.1 has no reason code in PUBACK: a broker that refuses a publish (an ACL) acknowledges it all the
# same (Mosquitto does), so the row is deleted as delivered and the result is lost without a trace.
SINK_311_HINT = ("with MQTT 3.1.1 a publish the uplink broker refuses (ACL) is acknowledged all the same and the "
                 "result deleted unseen: set sink.protocol = \"5\" (MQTT 5 reports the refusal; the row stays)")


def packet_bytes(topic: str, payload: bytes, v5: bool) -> int:
    """Size on the wire of a QoS 1 PUBLISH: fixed header, topic, packet id, (MQTT 5) empty properties, payload."""
    remaining = 2 + len(topic.encode()) + 2 + (1 if v5 else 0) + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


@dataclass(slots=True)
class _Inflight:
    record: Record
    replayed: bool


class Sink:
    def __init__(self, cfg: SinkConfig, outbox: Outbox, gateway: str, client_id: str,
                 dead_letter_topic: str = "edge/deadletter") -> None:
        self._cfg = cfg
        self._v5 = cfg.protocol == "5"
        self._dead_letter_topic = dead_letter_topic
        self._max_packet = cfg.max_packet_bytes  # lowered by the broker's Maximum Packet Size (MQTT 5 CONNACK)
        self._outbox = outbox
        self.status_topic = cfg.status_topic.replace("{gateway}", gateway)
        self._gateway = gateway
        self._client = make_client(
            cfg,
            client_id,
            name="sink",
            persistent=False,
            inflight=cfg.inflight,
            will=Will(self.status_topic, self._status(False)),
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._backoff = ReconnectBackoff(self._client, cfg, "sink")
        self._settled: collections.deque[tuple[int, object]] = collections.deque()  # (mid, reason) from paho
        # Owned by the dispatcher thread alone:
        self._inflight: dict[int, _Inflight] = {}
        self._failed: collections.deque[tuple[float, _Inflight]] = collections.deque()
        self._acked: list[int] = []  # PUBACKed seqs not deleted yet
        self._last_accept = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._new_connection = False
        self._boundary = 0  # rows with seq <= boundary are backlog
        self._backlog_cursor = 0
        self._live_cursor = 0
        self._bucket = TokenBucket(cfg.replay_rate, cfg.replay_burst)
        self._thread: threading.Thread | None = None
        self.published = 0
        self.replayed = 0
        self.rejected = 0  # PUBACKs with a failure reason code (each row is retried after RETRY_DELAY_S)
        self.oversized = 0  # rows over the uplink's Maximum Packet Size, replaced by a small dead letter
        self.reconnects = 0

    def _status(self, online: bool) -> bytes:
        state = {"state": "online" if online else "offline", "gateway": self._gateway, "version": __version__}
        if online:
            state["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return json.dumps(state).encode()

    @property
    def connected(self) -> threading.Event:
        return self._connected

    # paho callbacks ---------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
        if is_failure(rc):
            log.error(
                "sink.connect_refused",
                reason=str(rc),
                host=self._cfg.host,
                port=self._cfg.port,
                hint=refused_hint("sink", rc),
            )
            return
        announced = getattr(_p, "MaximumPacketSize", None) if _p is not None else None
        if announced:
            self._max_packet = min(announced, self._cfg.max_packet_bytes or announced)
        self._backoff.connected()
        client.publish(self.status_topic, self._status(True), qos=1, retain=True)
        self._new_connection = True
        self._connected.set()
        self._wake.set()
        log.info("sink.connected", host=self._cfg.host, port=self._cfg.port)

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
        if self._connected.is_set() and is_failure(rc):
            self.reconnects += 1
            log.warning("sink.disconnected", reason=str(rc), inflight=len(self._inflight))
        self._connected.clear()
        self._backoff.disconnected()

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, rc: object, _p: object = None) -> None:
        # Runs under paho's message mutex: take no lock of ours here (publish() needs paho's mutex while
        # the dispatcher would hold ours). A deque append is atomic; the dispatcher settles it.
        self._settled.append((mid, rc))
        self._wake.set()

    # dispatcher -------------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def _publish(self, item: _Inflight) -> None:
        rec = item.record
        payload = mark_replayed(rec.payload) if item.replayed else rec.payload
        topic, retain = rec.topic, rec.retain
        if self._max_packet is not None and packet_bytes(topic, payload, self._v5) > self._max_packet:
            self._replace_oversized(rec, topic, len(payload))
            return
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        # A PUBACK for this mid may already sit in _settled; it is read only after this returns.
        self._inflight[info.mid] = item
        self.published += 1
        self.replayed += item.replayed

    def _replace_oversized(self, rec: Record, topic: str, size: int) -> None:
        """A row the uplink would refuse (it disconnects us, paho resends on reconnect, forever) becomes a small
        dead letter naming the result, committed before the row is deleted: nothing vanishes silently."""
        limit = self._max_packet
        reason = f"result {rec.id} for {topic} is {size} bytes, over the uplink's Maximum Packet Size of {limit}"
        rid = result_id(self._gateway, topic, self._dead_letter_topic, rec.id, b"")
        dead = deadletter_payload(rid=rid, topic=topic, received_at=rec.created_at,
                                  kind=DeadLetterKind.PACKET_TOO_LARGE, reason=reason, payload=rec.payload,
                                  gateway=self._gateway, keep_bytes=0)
        log.error("sink.result_too_large", id=rec.id, topic=topic, bytes=size, max_packet_bytes=limit,
                  dead_letter=rid, hint="raise the uplink broker's max_packet_size, or lower pipeline.max_result_bytes")
        if packet_bytes(self._dead_letter_topic, dead, self._v5) <= (limit or 0):
            self._outbox.put_many([], dead=[(rid, self._dead_letter_topic, dead)])
        else:
            log.error("sink.dead_letter_too_large", id=rec.id, max_packet_bytes=limit, hint="the row is dropped")
        self._outbox.accept([rec.seq])
        self.oversized += 1

    def _settle(self) -> list[int]:
        """Match PUBACKs to rows; return the seqs to delete."""
        acked: list[int] = []
        while self._settled:
            mid, rc = self._settled.popleft()
            item = self._inflight.pop(mid, None)
            if item is None:
                continue  # the status message
            if is_failure(rc):
                self._failed.append((time.monotonic() + RETRY_DELAY_S, item))
                self.rejected += 1
                topic = item.record.topic
                log.error("sink.publish_rejected", reason=str(rc), topic=topic, id=item.record.id)
            else:
                acked.append(item.record.seq)
        return acked

    def _dispatch(self) -> None:
        self._acked.extend(self._settle())
        try:
            self._refill()
        finally:
            # Deleted after the window is refilled, so the delete's disk write never idles the window.
            # A delete that fails (a full disk) raises to _run and is retried next round: forgetting the
            # seqs would strand PUBACKed rows in the outbox until a restart sent them again.
            # Deletes are grouped: one transaction per window's worth of PUBACKs (or when nothing is in flight,
            # or every ACCEPT_WITHIN_S), not one per wake-up. A row PUBACKed but not yet deleted when we crash
            # is sent again after the restart: at-least-once allows it, and its id lets consumers drop it.
            now = time.monotonic()
            if self._acked and (len(self._acked) >= self._cfg.inflight or not self._inflight
                                or now - self._last_accept >= ACCEPT_WITHIN_S):
                self._outbox.accept(self._acked)
                self._acked.clear()
                self._last_accept = now

    def _refill(self) -> None:
        if self._new_connection:
            self._new_connection = False
            # Everything committed but not yet handed to paho is backlog now.
            self._boundary = self._outbox.max_seq()
            self._live_cursor = self._boundary
        if not self._connected.is_set():
            return
        room = self._cfg.inflight - len(self._inflight)
        now = time.monotonic()
        while room > 0 and self._failed and self._failed[0][0] <= now:
            self._publish(self._failed.popleft()[1])
            room -= 1
        if room > 0:
            for rec in self._outbox.batch(room, after_seq=self._live_cursor):
                self._publish(_Inflight(rec, False))
                self._live_cursor = rec.seq
                room -= 1
        # The backlog lane refills a quarter window at a time (or an empty window): one read per 16 PUBACKs
        # rather than one per PUBACK wake-up. Live rows above never wait for it.
        if room >= max(1, self._cfg.inflight // 4) or (room > 0 and not self._inflight):
            self._refill_backlog(room)

    def _refill_backlog(self, room: int) -> None:
        if self._backlog_cursor < self._boundary:
            want = self._bucket.take(room)
            if want:
                handed = {i.record.seq for i in self._inflight.values()}
                handed.update(i.record.seq for _, i in self._failed)
                handed.update(self._acked)  # PUBACKed, their delete still to come
                rows = self._outbox.batch(want, after_seq=self._backlog_cursor, up_to_seq=self._boundary)
                for rec in rows:
                    if rec.seq not in handed:  # handed to paho before the outage: paho re-sends it
                        self._publish(_Inflight(rec, True))
                    self._backlog_cursor = rec.seq
                if not rows:
                    self._backlog_cursor = self._boundary

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.05 if self._backlog_cursor < self._boundary else 0.5)
            self._wake.clear()
            try:
                self._dispatch()
            except Exception:  # never let one bad round kill the only publisher
                log.exception("sink.dispatch_failed")
                time.sleep(1.0)

    # lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._cfg.protocol == "3.1.1":
            log.warning("sink.protocol_3_1_1", host=self._cfg.host, port=self._cfg.port, hint=SINK_311_HINT)
        connect_async(self._client, self._cfg, persistent=False)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="edge-agent-sink", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        return len(self._inflight) + len(self._failed)

    def flush(self, timeout: float) -> bool:
        """Wait until every committed row is PUBACKed, or the timeout. True when nothing is left."""
        deadline = time.monotonic() + timeout
        while self._connected.is_set() and time.monotonic() < deadline:  # no uplink: the outbox keeps it
            self._wake.set()
            if self.pending() == 0 and self._outbox.stats().count == 0:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._acked.extend(self._settle())
        if self._acked:
            try:
                self._outbox.accept(self._acked)
            except OutboxError as e:  # a full disk: stop cleanly anyway
                log.warning("sink.accept_failed", rows=len(self._acked), error=str(e),
                            hint="these PUBACKed rows are sent again after the restart")
        if self._connected.is_set():
            info = self._client.publish(self.status_topic, self._status(False), qos=1, retain=True)
            # Disconnected meanwhile: the broker publishes our will instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()

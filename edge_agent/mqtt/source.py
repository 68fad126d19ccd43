"""The source: the gateway's local broker, where notes and logs arrive.

QoS 1, persistent session, `manual_ack=True`: an inbound message is acknowledged only after its
result (or dead-letter record) is committed to the outbox — the at-least-once rule. `on_message`
never blocks: it hands the message to a bounded queue; back-pressure comes from the broker, which
sends at most Receive Maximum unacknowledged messages (MQTT 5).

A persistent session keeps its subscriptions across our restarts, so a route removed from the config
would still be delivered (and dead-lettered, restart after restart). The filters subscribed are
remembered (the Agent keeps them in the outbox file) and those no route has any more are unsubscribed
on connect. On MQTT 5 every subscription uses Retain Handling 1: retained messages come only with a new
subscription, not again on each reconnect or restart of a resumed session.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config import RouteConfig, SourceConfig
from ..message import Inbound
from .client import ReconnectBackoff, connect_async, is_failure, make_client, refused_hint

log = structlog.get_logger(__name__)


class Source:
    def __init__(self, cfg: SourceConfig, routes: tuple[RouteConfig, ...], client_id: str, *,
                 subscribed_before: Iterable[str] = (), remember: Callable[[list[str]], None] | None = None,
                 extra_filters: Iterable[str] = ()) -> None:
        self._cfg = cfg
        self._extra = set(extra_filters)  # not routes, kept through reloads: the digest request topic
        self._filters = sorted({r.topic for r in routes} | self._extra)
        # Subscriptions the broker may hold for our session (as subscribed: shared ones with their $share
        # prefix): from earlier runs (`subscribed_before`), or removed by a reload while disconnected.
        # Those no route has are unsubscribed on connect; `remember` keeps the set across restarts.
        self._stale: set[str] = set(subscribed_before)
        self._remember = remember
        self.queue: queue.Queue[Inbound] = queue.Queue(maxsize=max(cfg.receive_maximum * 2, 1024))
        self._v5 = cfg.protocol == "5"
        self._client = make_client(cfg, client_id, name="source", persistent=True, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._backoff = ReconnectBackoff(self._client, cfg, "source")
        self._accepting = threading.Event()
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker granted every filter once: intake works (READY)
        self.received = 0
        self.backpressure = 0  # half-second waits on a full queue
        self.reconnects = 0

    # paho callbacks (run on paho's network thread; must not block) ------------------------------
    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
        if is_failure(rc):
            log.error(
                "source.connect_refused",
                reason=str(rc),
                host=self._cfg.host,
                port=self._cfg.port,
                hint=refused_hint("source", rc),
            )
            return
        self._backoff.connected()
        if self._cfg.share_group:
            # A session from before the group was configured may still hold the plain filters: with them,
            # this member would get every message on top of its share.
            client.unsubscribe(self._filters)
        wanted = self._subscriptions(self._filters)
        self._keep(self._stale | set(wanted))  # before subscribing: a crash now must not forget any of them
        if stale := sorted(self._stale - set(wanted)):
            client.unsubscribe(stale)  # a persistent session keeps them
            log.info("source.unsubscribed", filters=stale, why="no route has them any more")
        self._stale.clear()
        # Re-subscribing on a resumed session is harmless, and needed when the broker lost it.
        client.subscribe([(sub, self._options()) for sub in wanted])
        if self.connected.is_set():
            return
        self.connected.set()
        log.info(
            "source.connected",
            host=self._cfg.host,
            port=self._cfg.port,
            filters=self._filters,
            share_group=self._cfg.share_group,
        )

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, codes: list, _p: object = None) -> None:
        refused = [str(c) for c in codes if is_failure(c)]
        if refused:  # an ACL, most likely: never READY, so systemd reports the failed start
            log.error("source.subscribe_refused", reasons=refused, filters=self._filters)
            return
        if not self._stale:  # nothing removed meanwhile that the broker may still hold
            self._keep(set(self._subscriptions(self._filters)))
        self.subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
        if self.connected.is_set() and is_failure(rc):
            self.reconnects += 1
            log.warning("source.disconnected", reason=str(rc))
        self.connected.clear()
        self._backoff.disconnected()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        item = Inbound(msg.topic, msg.payload, msg.mid, msg.qos, time.time())
        # Blocking here when the queue is full stops paho reading the socket: TCP back-pressure. Mosquitto
        # 2.0 can send more than Receive Maximum (a whole window per PUBACK), so "cannot fill" is not true,
        # and dropping an unacked message would strand it until the next session. Acks do not need this
        # thread to return (paho queues them), so the pipeline keeps draining and this unblocks.
        while self._accepting.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                self.received += 1
                return
            except queue.Full:
                self.backpressure += 1
        # Stopping: left unacked, the broker redelivers it to our next session.

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting.set()
        connect_async(self._client, self._cfg, persistent=True, receive_maximum=self._cfg.receive_maximum)
        self._client.loop_start()

    def stop_intake(self) -> None:
        self._accepting.clear()

    def unsubscribe_removed(self, routes: tuple[RouteConfig, ...]) -> list[str]:
        """Hot reload, before the pipeline swap: stop subscriptions no new route has.

        Messages the broker already sent us stay queued and are processed (and acked) as usual. The session is
        persistent, so a filter we cannot unsubscribe now (disconnected) is unsubscribed on the next connect.
        """
        keep = {r.topic for r in routes} | self._extra
        removed = [f for f in self._filters if f not in keep]
        if removed:
            self._filters = [f for f in self._filters if f in keep]
            subs = self._subscriptions(removed)
            if self._client.unsubscribe(subs)[0] != mqtt.MQTT_ERR_SUCCESS:
                self._stale.update(subs)
        return removed

    def subscribe_added(self, routes: tuple[RouteConfig, ...]) -> list[str]:
        """Hot reload, after the pipeline swap (so nothing arrives before a route can take it): new filters.
        Disconnected, the next connect subscribes them with the rest."""
        added = sorted({r.topic for r in routes} - set(self._filters))
        if added:
            self._filters = sorted({*self._filters, *added})
            self._keep(self._stale | set(self._subscriptions(self._filters)))
            self._client.subscribe([(sub, self._options()) for sub in self._subscriptions(added)])
        return added

    def _subscriptions(self, filters: Iterable[str]) -> list[str]:
        return [self._cfg.subscription(f) for f in filters]

    def _options(self) -> SubscribeOptions | int:
        # Retain Handling 1: retained messages only when the subscription is new, not on every resubscribe
        # of a resumed session (a retained note was processed again at each restart and reconnect).
        return SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB) if self._v5 else 1

    def _keep(self, subscriptions: set[str]) -> None:
        if self._remember is None:
            return
        try:
            self._remember(sorted(subscriptions))
        except Exception as e:  # a full disk: the next connect tries again; never kill paho's thread
            log.warning("source.remember_failed", error=str(e))

    def ack(self, item: Inbound) -> None:
        if item.qos > 0:
            self._client.ack(item.mid, item.qos)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

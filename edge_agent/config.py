"""One frozen configuration model, read from TOML, with environment overrides.

Every stage receives only its own section. Unknown keys are rejected so that a typo fails at start
instead of being silently ignored for years.

Environment overrides (for secrets and ports that differ per gateway):
``EDGE_AGENT__<SECTION>__<KEY>=value`` sets ``[section] key``; nested sections go deeper with more
``__`` (``EDGE_AGENT__SINK__TLS__CA_FILE=/etc/ssl/ca.pem``). Values are parsed as TOML scalars when they
parse (``1884``, ``true``, ``"x"``), else taken as strings. Routes and tasks come from the file only.
"""

from __future__ import annotations

import math
import os
import re
import re._constants as sre
import re._parser as sre_parse
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .topics import RESERVED, SEGMENT_NAME, check_template

ENV_PREFIX = "EDGE_AGENT__"
_TOPIC_WILDCARDS = re.compile(r"[+#]")
MAX_TOPIC_BYTES = 65535  # MQTT: a topic is a UTF-8 string with a two-byte length
# What MQTT forbids in a UTF-8 string (U+0000, surrogates) and what it says SHOULD NOT be there (controls,
# non-characters): Mosquitto disconnects a client that publishes or subscribes to such a topic, on every try.
_TOPIC_BAD_CHARS = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(p + 0xFFFE)}{chr(p + 0xFFFF)}" for p in range(0, 0x110000, 0x10000))
    + "]"
)
MAX_CONFIG_DEPTH = 32  # tables and arrays nested in the config file; the deepest real key needs 4


def _no_wildcards(topic: str, what: str) -> str:
    """A topic we publish to: MQTT wildcards are for subscribing only."""
    if _TOPIC_WILDCARDS.search(topic):
        raise ValueError(f"{what} must not contain '+' or '#'")
    return topic


def _mqtt_string(topic: str, what: str) -> str:
    """A topic (name or filter) the broker accepts: at most 65535 bytes of UTF-8, no forbidden character.
    Either would fail only at run time, on every publish or subscribe, with the broker dropping the link."""
    if bad := _TOPIC_BAD_CHARS.search(topic):
        detail = (f"{what} contains U+{ord(bad.group()):04X} at character {bad.start()}, which MQTT forbids in a "
                  "topic (U+0000, control characters, surrogates, non-characters)")
        raise PydanticCustomError("mqtt_topic", "{detail}", {"detail": detail})
    if (n := len(topic.encode())) > MAX_TOPIC_BYTES:
        detail = f"{what} is {n} bytes of UTF-8; MQTT allows at most {MAX_TOPIC_BYTES}"
        raise PydanticCustomError("mqtt_topic", "{detail}", {"detail": detail})
    return topic


def _backtracking_risk(pattern: str) -> str | None:
    r"""Why `pattern` can take time exponential in the note's length in Python's backtracking engine, or None.

    The rule: a group that a greedy or lazy quantifier repeats (`*`, `+`, `{m,n}` with n > 1) may not hold a
    quantifier of variable length or an alternation with two non-empty branches, because then the same text
    splits into iterations in exponentially many ways and a failing match tries them all (`(a+)+$`,
    `(\w+\s?)*$`, `(a|aa)+$`). A possessive quantifier (`*+`, `++`, `{m,n}+`) or an atomic group `(?>...)`
    never gives back what it matched, so it is safe as the repeated group; its contents are checked in turn.
    """

    def ambiguous(items: sre_parse.SubPattern | list) -> str | None:
        for op, av in items:
            if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
                lo, hi, body = av
                if lo != hi:
                    return "a quantifier inside a repeated group"
                if why := ambiguous(body):
                    return why
            elif op is sre.BRANCH:
                alternatives = av[1]
                if sum(1 for b in alternatives if b) > 1 or len({sre_parse.SubPattern(tree.state, b).getwidth()
                                                                 for b in alternatives}) > 1:
                    return "an alternation inside a repeated group"
                for b in alternatives:
                    if why := ambiguous(b):
                        return why
            elif op is sre.SUBPATTERN:
                if why := ambiguous(av[-1]):
                    return why
            elif op in (sre.ASSERT, sre.ASSERT_NOT) and (why := ambiguous(av[1])):
                return why
            elif op is sre.GROUPREF_EXISTS:
                for b in av[1:]:
                    if b is not None and (why := ambiguous(b)):
                        return why
            # ATOMIC_GROUP and POSSESSIVE_REPEAT give nothing back: opaque here, checked by walk()
        return None

    def walk(items: sre_parse.SubPattern | list) -> str | None:
        for op, av in items:
            children: list = []
            if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
                _lo, hi, body = av
                if hi > 1 and (why := ambiguous(body)):
                    return why
                children = [body]
            elif op is sre.POSSESSIVE_REPEAT:
                children = [av[2]]
            elif op is sre.SUBPATTERN:
                children = [av[-1]]
            elif op is sre.ATOMIC_GROUP:
                children = [av]
            elif op is sre.BRANCH:
                children = av[1]
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                children = [av[1]]
            elif op is sre.GROUPREF_EXISTS:
                children = [b for b in av[1:] if b is not None]
            for child in children:
                if why := walk(child):
                    return why
        return None

    tree = sre_parse.parse(pattern)
    return walk(tree)


class _Frozen(BaseModel):
    # allow_inf_nan: no setting means anything at inf or nan (a drain timeout of inf crashes the stop).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TLSConfig(_Frozen):
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate for mutual TLS")
    key_file: Path | None = Field(None, description="private key of cert_file")
    insecure: bool = Field(False, description="skip hostname verification (testing only)")

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both for mutual TLS, or neither")
        return self


class BrokerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = Field(None, min_length=1, max_length=64)
    keepalive: int = Field(30, ge=5, le=65535, description="seconds; a dead link is noticed after 1.5x")
    username: str | None = None
    password_file: Path | None = Field(None, description="file holding the password (only the path is kept)")
    password_credential: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.@-]+$",
        description="systemd credential name (LoadCredential=NAME:...): read from $CREDENTIALS_DIRECTORY/NAME",
    )
    tls: TLSConfig | None = None
    session_expiry: int = Field(
        7 * 24 * 3600,
        ge=0,
        le=2**32 - 1,  # a four-byte integer in CONNECT; paho's thread dies on a larger one
        description="seconds the broker keeps our session (MQTT 5) after a disconnect",
    )
    reconnect_min_delay: float = Field(1.0, gt=0)
    reconnect_max_delay: float = Field(30.0, gt=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_str(cls, v: Any) -> Any:
        # `protocol = 5` in TOML is an int; accept it rather than make people quote it.
        return str(v) if isinstance(v, int | float) else v

    @model_validator(mode="after")
    def _delays(self) -> BrokerConfig:
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay must be >= reconnect_min_delay")
        secret = "password_file" if self.password_file is not None else "password_credential"
        if self.password_file is not None and self.password_credential is not None:
            raise ValueError("set password_file or password_credential, not both")
        if getattr(self, secret) is not None and self.username is None:
            raise ValueError(f"{secret} is set but username is not: set username too")
        return self


class SourceConfig(BrokerConfig):
    receive_maximum: int = Field(
        256, ge=1, le=65535, description="unacked inbound messages the broker may send us (MQTT 5)"
    )
    share_group: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="subscribe $share/<group>/<filter>: agents in one group split the stream (README: Scaling)",
    )

    @model_validator(mode="after")
    def _member_id(self) -> SourceConfig:
        # Each member's persistent session holds its share while it is down (Mosquitto redelivers it only
        # to that session): a stable, distinct client id is what brings those messages back after a restart.
        if self.share_group is not None and self.client_id is None:
            raise ConfigError(
                "source.client_id",
                "share_group is set but client_id is not",
                "give each member of the group its own stable client_id (e.g. EDGE_AGENT__SOURCE__CLIENT_ID=edge-a):"
                " a restarted member gets the messages the broker held for it only by resuming its session",
            )
        return self

    def subscription(self, topic_filter: str) -> str:
        """The filter as subscribed: shared when a group is set. Routing keeps the plain filter."""
        return f"$share/{self.share_group}/{topic_filter}" if self.share_group else topic_filter


class SinkConfig(BrokerConfig):
    inflight: int = Field(64, ge=1, le=65535, description="QoS 1 publishes awaiting PUBACK at once")
    replay_rate: float = Field(
        500.0, gt=0, description="backlog results per second replayed after an outage (token bucket)"
    )
    replay_burst: int = Field(100, ge=1, le=2**31 - 1)
    status_topic: str = Field("edge/status/{gateway}", min_length=1)
    max_packet_bytes: int | None = Field(
        None, ge=512, le=268_435_460,
        description="the uplink broker's largest accepted packet; MQTT 5 brokers announce it in CONNACK (the "
        "smaller of the two applies). A result over it becomes a small dead letter instead of blocking the uplink",
    )

    @field_validator("status_topic")
    @classmethod
    def _status_concrete(cls, v: str) -> str:
        # paho raises on a wildcard inside its network thread, which would stop the sink's connection for good.
        return _mqtt_string(_no_wildcards(v, "status_topic"), "status_topic")


class OutboxConfig(_Frozen):
    path: Path = Path("/var/lib/edge-agent/outbox.db")
    max_bytes: int = Field(512 * 1024 * 1024, ge=64 * 1024, description="oldest results dropped beyond this")
    dead_letter_max_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024,
        description="dead letters' own bound, beside max_bytes: beyond it the oldest dead letters are dropped, "
        "never a result (a flood of bad input cannot evict good results)",
    )
    max_age_s: float = Field(30 * 24 * 3600, gt=0, description="rows older than this are dropped")
    recent_max_bytes: int = Field(
        256 * 1024 * 1024, ge=64 * 1024,
        description="published results kept for the digest and corrections (beside max_bytes); oldest go first",
    )


class PipelineConfig(_Frozen):
    batch_max: int = Field(256, ge=1, le=10_000, description="messages processed and committed together")
    batch_wait_ms: int = Field(
        5, ge=0, le=10_000,
        description="how long to wait to fill a batch once a message is in (a busy pipeline finds its next batch "
                    "waiting; an idle one makes a lone note wait this long: bench/run.py latency)",
    )
    drain_timeout_s: float = Field(10.0, ge=0, description="on stop, how long to finish queued work")
    batch_max_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="payload bytes processed together: a batch closes at batch_max messages or this, whichever "
        "comes first (a single larger message still makes a batch of one)",
    )
    max_payload_bytes: int = Field(256 * 1024, ge=16, le=256 * 1024 * 1024)
    max_json_depth: int = Field(32, ge=1, le=1000)
    max_items: int = Field(
        100, ge=1, le=100_000,
        description="items per list in a task's result (assets, measurements, entities...); beyond it the list is "
        "cut and the task's result carries \"truncated\": true",
    )
    max_result_bytes: int = Field(
        1024 * 1024, ge=1024, le=256 * 1024 * 1024,
        description="a result larger than this (serialised) becomes a dead letter (kind result_too_large)",
    )
    dead_letter_payload_bytes: int = Field(
        8 * 1024, ge=0, le=256 * 1024 * 1024,
        description="bytes of the offending payload a dead letter keeps; a longer one keeps this prefix, its "
        "length and sha256 (\"truncated\": true)",
    )


class PatternsTaskConfig(_Frozen):
    kind: Literal["patterns"] = "patterns"
    asset_patterns: tuple[str, ...] = Field(
        (r"\b[A-Z]{1,4}-?\d{2,5}[A-Z]?\b",), description="regexes for asset tags (e.g. P-101, HX12)"
    )
    code_patterns: tuple[str, ...] = Field(
        (r"\b(?:E|ERR|F|ALM|A)[-_ ]?\d{2,5}\b",), description="regexes for alarm/fault codes (e.g. E-042)"
    )
    units: bool = Field(True, description="extract numbers with units, normalised")

    @field_validator("asset_patterns", "code_patterns")
    @classmethod
    def _compiles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"regex {p!r} does not compile: {e}") from e
            except (RecursionError, OverflowError) as e:  # groups nested thousands deep, a {n} over 4 G
                raise ValueError(f"regex {p!r} does not compile: {e}") from None
            if why := _backtracking_risk(p):
                # Every note runs through these: one that backtracks exponentially stalls the whole pipeline.
                detail = f"regex {p!r} can take exponential time on some notes ({why})"
                raise PydanticCustomError("regex_backtracking", "{detail}", {"detail": detail})
        return v


class _EncoderTask(_Frozen):
    model: Path = Field(description="model directory made by `edge-agent models build` or a workstation tuner "
                        "(edge_agent.train: finetune_classifier, align_encoder); verified at load")
    intra_threads: int = Field(0, ge=0, le=64, description="threads per batch; 0 = min(4, CPU cores)")
    inter_threads: int = Field(1, ge=1, le=16, description="batches run in parallel")
    max_length: int = Field(128, ge=8, le=512, description="tokens per note; longer notes are truncated")


class ClassifierTaskConfig(_EncoderTask):
    kind: Literal["classifier"]
    head: Path | None = Field(None, description="head trained by `edge-agent classifier train`")
    labels: dict[str, str] = Field(
        default_factory=dict, description="label -> description, for zero-shot use when there is no head"
    )
    threshold: float = Field(0.0, ge=0, le=1, description="below this score the result is flagged for review")
    allow_new_labels: bool = Field(False, description="accept corrections with a label the task does not have yet")
    learn: bool = Field(False, description="retrain the head on the gateway from corrections (needs [feedback])")
    examples: Path | None = Field(None, description="the head's original {text, label} rows, kept in every retrain")
    retrain_every: int = Field(25, ge=1, le=100_000, description="retrain after this many new corrections")
    retrain_interval_s: float = Field(3600.0, gt=0, description="or after this long, when any correction is new")
    holdout: float = Field(0.2, gt=0, lt=1, description="share of corrections held back to judge old vs new head")

    @model_validator(mode="after")
    def _head_or_labels(self) -> ClassifierTaskConfig:
        if self.head is None and len(self.labels) < 2:
            raise ValueError(
                "a classifier needs a head (edge-agent classifier train) or at least two labels with descriptions"
            )
        return self


class TaggerTaskConfig(_EncoderTask):
    kind: Literal["tagger"]
    head: Path = Field(description="head trained by `edge-agent tagger train`")


_DEFAULT_FIELDS = {
    "asset": "the equipment or component the note is about",
    "symptom": "what is wrong with it",
    "action": "what was done or needs doing",
}


class GeneratorTaskConfig(_Frozen):
    kind: Literal["generator"]
    model: Path = Field(description="a generator directory made by `edge-agent models build`")
    fields: dict[str, str] = Field(
        default_factory=lambda: dict(_DEFAULT_FIELDS), description="field name -> what it means, in order"
    )
    max_field_tokens: int = Field(16, ge=1, le=256, description="tokens generated per field at most")
    intra_threads: int = Field(0, ge=0, le=64, description="threads per batch; 0 = min(4, CPU cores)")
    inter_threads: int = Field(1, ge=1, le=16)
    batch_size: int = Field(
        8, ge=1, le=256,
        description="notes per model call at most; memory grows with it (Qwen 0.5B's task: 1.43 GB peak at 8, "
                    "bench/run.py generate)",
    )
    batch_tokens: int = Field(
        512, ge=16, le=65536,
        description="prompt tokens (a note's own, after the cached static prompt) per model call at most; a note "
                    "longer than this runs alone. CTranslate2 computes the vocabulary's logits for every prompt "
                    "token of a batch: ~0.6 MB each with Qwen's 152k vocabulary, so this bounds the memory that "
                    "long notes take (8 notes of 512 tokens would need ~2.4 GB)",
    )

    @field_validator("fields")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("declare at least one field (name = description)")
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
                raise ValueError(f"field name {name!r} must be lower-case letters, digits or '_'")
        return v


class LogTemplateTaskConfig(_Frozen):
    kind: Literal["log_template"]
    similarity: float = Field(0.4, gt=0, lt=1, description="drain3 similarity threshold")
    depth: int = Field(4, ge=3, le=10, description="drain3 parse-tree depth")
    max_clusters: int = Field(1000, ge=1, description="templates kept (least recently used dropped)")
    state_file: Path | None = Field(None, description="persist learned templates here across restarts")


TaskConfig = Annotated[
    PatternsTaskConfig | ClassifierTaskConfig | TaggerTaskConfig | GeneratorTaskConfig | LogTemplateTaskConfig,
    Field(discriminator="kind"),
]




class RouteConfig(_Frozen):
    topic: str = Field(min_length=1, description="MQTT topic filter, wildcards allowed")
    topic_segments: tuple[str, ...] = Field(
        (), description="names for the inbound topic's levels, in order, usable as {name} in output topics (UNS)"
    )
    format: Literal["auto", "sparkplug"] = Field(
        "auto", description="auto: JSON or plain text; sparkplug: Sparkplug B protobuf, one note per text metric"
    )
    text_metric: tuple[str, ...] = Field(
        (), validate_default=True, description="sparkplug: names of the string metrics that carry notes"
    )
    text_field: str = Field("text", min_length=1, description="JSON field (dotted path) holding the text")
    id_field: str | None = Field(None, min_length=1, description="JSON field (dotted path) with the producer id")
    output_topic: str = Field("edge/results/{topic}", min_length=1)
    review_topic: str | None = Field(
        None, min_length=1, description="results a task flags for review (low confidence) go here instead"
    )
    retain_latest_topic: str | None = Field(
        None, min_length=1, description="also publish each result here, retained: the latest one per {asset}"
    )
    tasks: tuple[str, ...] = ()
    max_payload_bytes: int | None = Field(
        None, ge=16, le=256 * 1024 * 1024, description="overrides pipeline.max_payload_bytes for this route"
    )
    rate_limit: float | None = Field(
        None, gt=0, description="messages/s this route processes; more are dead-lettered (default unlimited)"
    )
    rate_burst: int | None = Field(
        None, ge=1, le=2**31 - 1, description="messages allowed at once; default one second's worth"
    )

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> RouteConfig:
        if self.rate_burst is not None and self.rate_limit is None:
            raise ValueError("rate_burst is set but rate_limit is not: set rate_limit (messages/s) too")
        return self

    @property
    def burst(self) -> int:
        """Token bucket size: rate_burst, else one second's worth of messages."""
        return self.rate_burst or max(1, math.ceil(self.rate_limit or 1))

    @field_validator("text_metric", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("text_metric")
    @classmethod
    def _sparkplug_only(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("format") == "sparkplug" and not v:
            raise ValueError('format = "sparkplug" needs the name(s) of the string metric(s) that carry notes')
        if info.data.get("format") != "sparkplug" and v:
            raise ValueError('text_metric applies to format = "sparkplug" only')
        return v

    @field_validator("topic")
    @classmethod
    def _filter_valid(cls, v: str) -> str:
        levels = v.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError("'#' must be a whole level and the last one (e.g. plant/#)")
            if "+" in level and level != "+":
                raise ValueError("'+' must be a whole level (e.g. plant/+/notes)")
        return _mqtt_string(v, "the topic filter")

    @field_validator("topic_segments")
    @classmethod
    def _segment_names(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for name in v:
            if not SEGMENT_NAME.fullmatch(name) or name in RESERVED:
                raise ValueError(
                    f"segment name {name!r} must be lower-case letters, digits or '_' and not one of {RESERVED}"
                )
        if len(set(v)) != len(v):
            raise ValueError("segment names must be distinct")
        levels = info.data.get("topic", "").split("/")
        if "#" not in levels and len(v) > len(levels):
            raise ValueError(f"{len(v)} names for a filter of {len(levels)} levels")
        return v

    @field_validator("output_topic", "review_topic", "retain_latest_topic")
    @classmethod
    def _output_template(cls, v: str | None, info: ValidationInfo) -> str | None:
        """Placeholders are known names (checked here, at load) and the topic is concrete."""
        if v is None:
            return v
        known = {"topic", "gateway", *info.data.get("topic_segments", ())}
        if info.field_name == "retain_latest_topic":
            known.add("asset")
        literal = check_template(v, known)
        _no_wildcards(literal, "an output topic")
        _mqtt_string(literal, "the output topic's fixed text")
        return v


class LogConfig(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class MetricsConfig(_Frozen):
    # Opt-in, and on loopback when on: a new listening port must never appear on a plant network just
    # because the daemon was upgraded. Scrape it from the gateway (node exporter style) or set host.
    enabled: bool = Field(False, description="serve Prometheus metrics over HTTP")
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on; loopback by default")
    port: int = Field(9464, ge=1, le=65535)


class MeasurementLimit(_Frozen):
    """Bounds for one quantity, in the patterns task's normalised unit (kPa, degC, ...)."""

    min: float | None = None
    max: float | None = None


class DigestConfig(_Frozen):
    """The shift handover digest: what happened per asset, built from the results already in hand."""

    enabled: bool = False
    topic: str = Field("edge/digest/{gateway}", min_length=1, description="on the sink broker; requests on "
                       "<topic>/request on the source broker")  # fmt: skip
    schedule: tuple[str, ...] = Field(("06:00", "14:00", "22:00"), description="local shift ends, HH:MM")
    timezone: str = Field("UTC", description="IANA time zone of the schedule, e.g. Europe/Berlin")
    keep_s: float = Field(3 * 24 * 3600, gt=0, le=366 * 24 * 3600,
                          description="how long results are kept for digests (in the outbox file)")
    max_items: int = Field(50, ge=1, le=10_000)
    urgency_task: str = Field("urgency", description="a classifier task whose label (high/medium/low) ranks items")
    done_labels: tuple[str, ...] = Field(
        ("done", "repaired", "fixed", "completed"),
        description="classifier labels that mark a note as work done (besides an extracted action)",
    )
    limits: dict[str, MeasurementLimit] = Field(
        default_factory=dict, description="quantity -> {min, max}: measurements outside are flagged out_of_range"
    )

    @field_validator("topic")
    @classmethod
    def _topic_concrete(cls, v: str) -> str:
        return _no_wildcards(v, "topic")

    @field_validator("schedule")
    @classmethod
    def _times(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for t in v:
            m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", t)
            if m is None:
                raise ValueError(f"{t!r} is not a time of day as HH:MM (00:00 to 23:59)")
        if len(set(v)) != len(v):
            raise ValueError("each time may appear once")
        return tuple(sorted(v))

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as Europe/Berlin, or UTC)") from e
        return v


class FeedbackConfig(_Frozen):
    """Corrections of published results, on the source broker (see edge_agent.feedback)."""

    enabled: bool = False
    topic: str = Field("edge/feedback/{gateway}", min_length=1)
    keep_s: float = Field(7 * 24 * 3600, gt=0, le=366 * 24 * 3600,
                          description="how long published results can be corrected by result_id")
    max_rows: int = Field(100_000, ge=100, le=10_000_000, description="corrections kept; the oldest go first")

    @field_validator("topic")
    @classmethod
    def _topic_concrete(cls, v: str) -> str:
        return _no_wildcards(v, "topic")


class Config(_Frozen):
    gateway_id: str = Field("gateway", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    dead_letter_topic: str = Field("edge/deadletter", min_length=1)
    source: SourceConfig = SourceConfig()
    sink: SinkConfig = SinkConfig()
    outbox: OutboxConfig = OutboxConfig()
    pipeline: PipelineConfig = PipelineConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    digest: DigestConfig = DigestConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    tasks: dict[str, TaskConfig] = Field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = Field(min_length=1)

    @field_validator("dead_letter_topic")
    @classmethod
    def _dlq_concrete(cls, v: str) -> str:
        return _mqtt_string(_no_wildcards(v, "dead_letter_topic"), "dead_letter_topic")

    @model_validator(mode="after")
    def _status_topic_fits(self) -> Config:
        topic = self.sink.status_topic.replace("{gateway}", self.gateway_id)
        try:
            _mqtt_string(topic, "status_topic")
        except PydanticCustomError as e:
            raise ConfigError("sink.status_topic", e.message(), _HINTS["mqtt_topic"]) from None
        return self

    @model_validator(mode="after")
    def _tasks_exist(self) -> Config:
        known = set(self.tasks) | set(BUILTIN_TASKS)
        for i, route in enumerate(self.routes):
            for name in route.tasks:
                if name not in known:
                    # ConfigError passes through pydantic untouched, keeping the precise field path.
                    raise ConfigError(
                        f"routes.{i}.tasks",
                        f"unknown task {name!r}",
                        f"declare it as [tasks.{name}] or use one of: {', '.join(sorted(known))}",
                    )
        return self

    @model_validator(mode="after")
    def _no_self_ingest(self) -> Config:
        """With source and sink on one broker, a route whose filter matches what the agent itself publishes
        there (its own results, the dead letters, the status) feeds on its own output: one result makes
        another, forever (a route on '#' grew an outbox to 384 MB in 25 s). Chains, one route reading another
        route's results, stay allowed."""
        if not _same_broker(self.source, self.sink):
            return self
        from paho.mqtt.client import topic_matches_sub  # a pure function: no client, no thread

        from .topics import output_topic

        status = self.sink.status_topic.replace("{gateway}", self.gateway_id)
        for i, route in enumerate(self.routes):
            sample = "/".join("x" if level in ("+", "#") else level for level in route.topic.split("/"))
            own = {
                f"output_topic {route.output_topic!r}": route.output_topic,
                f"review_topic {route.review_topic!r}": route.review_topic,
                f"retain_latest_topic {route.retain_latest_topic!r}": route.retain_latest_topic,
            }
            published = {
                what: output_topic(template, sample, self.gateway_id, {"asset": "x"})
                for what, template in own.items() if template
            }
            published[f"dead_letter_topic {self.dead_letter_topic!r}"] = self.dead_letter_topic
            if self.digest.enabled:
                published[f"digest.topic {self.digest.topic!r}"] = self.digest_topic
            published[f"sink.status_topic {self.sink.status_topic!r}"] = status
            for what, topic in published.items():
                if topic_matches_sub(route.topic, topic):
                    raise ConfigError(
                        f"routes.{i}.topic",
                        f"the filter {route.topic!r} matches the agent's own {what} on the same broker "
                        f"(e.g. {topic!r}): it would process its own output, forever",
                        "narrow the route's topic filter, or publish to topics outside it (or to another broker)",
                    )
        return self

    @model_validator(mode="after")
    def _learning_needs_feedback(self) -> Config:
        for name, t in self.tasks.items():
            if getattr(t, "learn", False) and not self.feedback.enabled:
                raise ConfigError(f"tasks.{name}.learn", "a task that learns from corrections needs them",
                                  "set [feedback] enabled = true, or learn = false")
        return self

    def task(self, name: str) -> TaskConfig:
        return self.tasks.get(name) or BUILTIN_TASKS[name]

    @property
    def digest_topic(self) -> str:
        return self.digest.topic.replace("{gateway}", self.gateway_id)

    @property
    def feedback_topic(self) -> str | None:
        """Where corrections arrive (on the source broker); None when feedback is off."""
        return self.feedback.topic.replace("{gateway}", self.gateway_id) if self.feedback.enabled else None

    @property
    def keep_results_s(self) -> float:
        """How long published results stay in the outbox file (0: not kept): the digest and corrections read them."""
        return max(self.digest.keep_s if self.digest.enabled else 0.0,
                   self.feedback.keep_s if self.feedback.enabled else 0.0)

    @property
    def digest_request_topic(self) -> str | None:
        """Where digests are asked for (on the source broker); None when digests are off."""
        return f"{self.digest_topic}/request" if self.digest.enabled else None


_LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def _same_broker(a: BrokerConfig, b: BrokerConfig) -> bool:
    host_a, host_b = a.host.lower(), b.host.lower()
    same_host = host_a == host_b or (host_a in _LOOPBACK and host_b in _LOOPBACK)
    return same_host and a.port == b.port


BUILTIN_TASKS: dict[str, PatternsTaskConfig] = {"patterns": PatternsTaskConfig()}
_TASK_KINDS = {get_args(m.model_fields["kind"].annotation)[0] for m in get_args(get_args(TaskConfig)[0])}

_HINTS = {
    "missing": "add this key",
    "extra_forbidden": "remove this key or check its spelling",
    "literal_error": "use one of the allowed values",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number",
    "float_parsing": "use a number",
    "bool_parsing": "use true or false",
    "string_type": "use a quoted string",
    "greater_than_equal": "raise the value",
    "greater_than": "raise the value",
    "less_than_equal": "lower the value",
    "string_too_short": "give a non-empty value",
    "string_pattern_mismatch": "use letters, digits, '.', '_' or '-' only",
    "too_short": "add at least one entry (e.g. one [[routes]] table)",
    "union_tag_invalid": "set kind to a known task kind: patterns, classifier, tagger, generator or log_template",
    "int_from_float": "use a whole number",
    "float_type": "use a number",
    "finite_number": "use a finite number (not nan or inf)",
    "bool_type": "use true or false",
    "less_than": "lower the value",
    "string_too_long": "shorten the value",
    "too_long": "use fewer entries",
    "mqtt_topic": "shorten it to at most 65535 bytes and keep to printable characters",
    "regex_backtracking": "make the inner quantifier possessive (++, *+, ?+) or the repeated group atomic (?>...)",
    "path_type": 'use a quoted file path, e.g. "/etc/edge-agent/ca.pem"',
    "tuple_type": 'use a list, e.g. ["a", "b"]',
    "list_type": 'use a list, e.g. ["a", "b"]',
    "dict_type": 'use a table of name = "value" pairs, e.g. { a = "x" }',
    "model_type": "make it a [section] table of keys, not a single value",
    "model_attributes_type": "make it a [section] table of keys, not a single value",
}


GENERIC_HINT = "see configs/ for a working example"

_FIELD_HINTS = {
    ("routes", "missing"): 'add at least one [[routes]] table, e.g. topic = "plant/+/notes"',
    ("routes", "tuple_type"): 'write each route as a [[routes]] table, e.g. topic = "plant/+/notes"',
}


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path or path[0] in ("routes", "tasks"):
            raise ConfigError(key, "routes and tasks cannot be set from the environment", "set them in the file")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"{part} is not a section", "override a key inside a section")
            node = child
        try:
            node[path[-1]] = tomllib.loads(f"v = {raw}")["v"]
        except (ValueError, RecursionError):  # TOMLDecodeError, a 5,000-digit number, [[[...]]] 5,000 deep
            node[path[-1]] = raw
    return data


def parse(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate a config mapping (as read from TOML) plus environment overrides."""
    data = _apply_env(dict(data), os.environ if environ is None else environ)
    _check_depth(data)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        if loc[:1] == ("tasks",) and len(loc) > 3 and loc[2] in _TASK_KINDS:
            loc = loc[:2] + loc[3:]  # pydantic puts the union's tag in the path: tasks.x.classifier.model
        field = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        hint = _FIELD_HINTS.get((field, err["type"])) or _HINTS.get(err["type"], GENERIC_HINT)
        raise ConfigError(field, msg, hint) from None


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file. Raises ConfigError naming the field and the fix."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("--config", f"cannot read {p}: {e.strerror}", "pass the path of a TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"not valid TOML: {e}", "fix the syntax at the line shown") from None
    except RecursionError:  # tomllib recurses once per [ or { level
        line = _too_deep_line(text)
        raise ConfigError(f"{p}, line {line}", f"arrays or inline tables nested more than {MAX_CONFIG_DEPTH} deep",
                          "flatten the value: no setting nests that deep") from None
    except ValueError:  # int() refuses a decimal number of more than sys.get_int_max_str_digits() digits
        digits = sys.get_int_max_str_digits()
        m = re.search(rf"[0-9_]{{{digits + 1},}}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else "?"
        raise ConfigError(f"{p}, line {line}", f"an integer of more than {digits} digits cannot be read",
                          "use a number of sensible size: every setting has a limit far below that") from None
    return parse(data, environ)


def _check_depth(data: dict[str, Any]) -> None:
    """Refuse data nested deeper than MAX_CONFIG_DEPTH (dotted keys a.a.a... make that without brackets), so
    that nothing downstream recurses into it. Iterative: a recursive walk would fail the way tomllib does."""
    stack: list[tuple[object, tuple[str, ...]]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_CONFIG_DEPTH:
            raise ConfigError(".".join(path[:3]) + ".…", f"nested more than {MAX_CONFIG_DEPTH} deep",
                              "flatten the value: no setting nests that deep")
        if isinstance(node, dict):
            stack.extend((v, (*path, str(k))) for k, v in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((v, (*path, str(i))) for i, v in enumerate(node))


def _too_deep_line(text: str) -> int | str:
    """The line where [ and { (outside strings and comments) first nest deeper than MAX_CONFIG_DEPTH."""
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif c in "\"'":
            quote = text[i : i + 3] if text[i : i + 3] in ('"""', "'''") else c
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                j += 2 if c == '"' and text[j] == "\\" else 1
            i = j + len(quote) - 1
        elif c in "[{":
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                return text.count("\n", 0, i) + 1
        elif c in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return "?"

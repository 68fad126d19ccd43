"""TLS for the broker connections: the context, and failures explained.

paho retries a failed TLS connection forever and says nothing about why (its loop swallows the
exception). So the context hands out sockets that explain their own failures: each TLS error, or a broker
that hangs up right after the handshake (what a missing client certificate looks like from our side), is
logged once as `<source|sink>.tls_failed` with the host:port, what went wrong and the likely fix.
"""

from __future__ import annotations

import ssl
import time

import structlog

from ..config import BrokerConfig
from ..errors import ConfigError
from .credentials import read_file

log = structlog.get_logger(__name__)

REPEAT_AFTER_S = 300.0  # the same failure is logged again after this long, not on every retry

# OpenSSL verify codes (X509_V_ERR_*) and alert reasons we can explain.
_EXPIRED, _NOT_YET_VALID = 10, 9
_NAME_MISMATCH = {62, 64}  # host name, IP address
_UNTRUSTED = {2, 18, 19, 20, 21}
_CERT_REJECTED = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)


def tls_context(cfg: BrokerConfig, name: str) -> ssl.SSLContext:
    """A client context for `cfg.tls`; a file that cannot be read or loaded is a ConfigError naming its key."""
    tls = cfg.tls
    assert tls is not None
    ctx = _ExplainingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.where = (name, cfg.host, cfg.port, tls.cert_file is not None)
    key = f"{name}.tls.ca_file"
    if tls.ca_file is None:
        ctx.load_default_certs()
    else:
        try:
            ctx.load_verify_locations(cadata=read_file(key, tls.ca_file).decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(key, f"{tls.ca_file} holds no usable CA certificate: {e}", "give a PEM file") from None
    if tls.cert_file is not None and tls.key_file is not None:
        for part in ("cert_file", "key_file"):
            read_file(f"{name}.tls.{part}", getattr(tls, part))  # names the unreadable one
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except ssl.SSLError as e:
            part = "key_file" if "KEY" in (e.reason or "") else "cert_file"
            raise ConfigError(
                f"{name}.tls.{part}",
                f"cannot load {tls.cert_file} with key {tls.key_file}: {e.reason or e}",
                "give the PEM client certificate and its own unencrypted private key",
            ) from None
    if tls.insecure:
        ctx.check_hostname = False
    return ctx


def explain(err: OSError | None, name: str, host: str, port: int, has_cert: bool, handshake: bool) -> tuple[str, str]:
    """(what went wrong, the likely fix) for a TLS failure during the handshake or before the broker's first reply
    (`err` None: it hung up)."""
    need_cert = f"broker requires a client certificate? set {name}.tls.cert_file/key_file"
    if not isinstance(err, ssl.SSLError) or isinstance(err, ssl.SSLEOFError) or not (err.reason or "").strip():
        if handshake:  # a plain-MQTT listener drops a ClientHello as a malformed packet
            return f"the broker dropped the TLS handshake ({err})", f"is port {port} a TLS listener? (usually 8883)"
        if has_cert:
            return (
                "the broker closed the connection right after the TLS handshake",
                "check the broker's log: it may reject this client certificate or client id",
            )
        return "the broker closed the connection right after the TLS handshake", need_cert
    if isinstance(err, ssl.SSLCertVerificationError):
        code, why = err.verify_code, err.verify_message
        if code in _NAME_MISMATCH:
            return (
                f"the broker's certificate is not valid for {host}: {why}",
                f"connect by a name in the certificate's subjectAltName, or reissue it for {host} "
                f"({name}.tls.insecure = true skips this check: testing only)",
            )
        if code in (_EXPIRED, _NOT_YET_VALID):
            return (
                f"the broker's certificate is out of date: {why}",
                "renew the broker's certificate, or fix this clock",
            )
        if code in _UNTRUSTED:
            return (
                f"the broker's certificate is not trusted: {why}",
                f"set {name}.tls.ca_file to the CA that signed the broker's certificate",
            )
        return (
            f"the broker's certificate failed verification: {why}",
            f"check {name}.tls.ca_file and the broker's certificate",
        )
    reason = err.reason or ""
    if "CERTIFICATE_REQUIRED" in reason or (not has_cert and "HANDSHAKE_FAILURE" in reason):
        return f"the broker asked for a client certificate ({reason})", need_cert
    if any(r in reason for r in _CERT_REJECTED):
        return (
            f"the broker rejected our client certificate ({reason})",
            f"have {name}.tls.cert_file signed by a CA the broker trusts, and renew it if it expired",
        )
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return f"the broker did not answer in TLS ({reason})", f"is port {port} a TLS listener? (MQTT over TLS: 8883)"
    return f"TLS failed: {err}", f"check the broker's TLS settings and {name}.tls"


class _ExplainingContext(ssl.SSLContext):
    where: tuple[str, str, int, bool]
    _last: tuple[str, float] = ("", 0.0)

    def report(self, err: OSError | None, handshake: bool) -> None:
        name, host, port, has_cert = self.where
        message, hint = explain(err, name, host, port, has_cert, handshake)
        now = time.monotonic()
        if self._last[0] == message and now - self._last[1] < REPEAT_AFTER_S:
            return  # paho retries every few seconds: say it once
        self._last = (message, now)
        log.error(f"{name}.tls_failed", host=host, port=port, error=message, hint=hint)


class _ExplainingSocket(ssl.SSLSocket):
    """Reports what paho would swallow: handshake errors, TLS alerts after it, a close before any reply."""

    _answered = False

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as e:  # verification, alerts, a reset or a timeout
            self.context.report(e, handshake=True)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            data = super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            self.context.report(e, handshake=False)
            raise
        except ConnectionError as e:
            if not self._answered:
                self.context.report(e, handshake=False)
            raise
        if not data and not self._answered:
            self.context.report(None, handshake=False)
        self._answered = self._answered or bool(data)
        return data


_ExplainingContext.sslsocket_class = _ExplainingSocket

"""The files a config names — passwords and TLS files — read at start, so a bad path fails there.

The config keeps only where a secret is (a path, or a systemd credential's name), never the secret. A file
that cannot be read is a ConfigError naming its key (`sink.tls.cert_file`) and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..config import BrokerConfig
from ..errors import ConfigError


def read_file(key: str, path: Path) -> bytes:
    """A file the config names, or a ConfigError naming the key and the fix."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            key,
            f"cannot read {path}: {e.strerror or e}",
            "check the path, and that the service user may read it (a root-only file: systemd LoadCredential=)",
        ) from None


def password_path(cfg: BrokerConfig, section: str, environ: Mapping[str, str] | None = None) -> tuple[str, Path] | None:
    """(config key, file) the password of `[section]` is read from, or None when it has none."""
    if cfg.password_file is not None:
        return f"{section}.password_file", cfg.password_file
    if cfg.password_credential is None:
        return None
    key = f"{section}.password_credential"
    creds = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if not creds:
        raise ConfigError(
            key,
            "CREDENTIALS_DIRECTORY is not set, so the credential cannot be read",
            f"run under systemd with LoadCredential={cfg.password_credential}:/path/to/secret, or use password_file",
        )
    return key, Path(creds) / cfg.password_credential


def password(cfg: BrokerConfig, section: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Read the password (trailing newline stripped). Never logged, never kept in the config."""
    where = password_path(cfg, section, environ)
    if where is None:
        return None
    key, path = where
    return read_file(key, path).decode("utf-8", errors="replace").rstrip("\r\n")

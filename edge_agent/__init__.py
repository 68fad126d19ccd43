"""edge-agent: MQTT notes and logs in, on-device classification and extraction, durable results out."""

import os
from importlib.metadata import PackageNotFoundError, version

# Before anything imports numpy: CTranslate2 owns the gateway's cores, and numpy's BLAS threads would only
# fight it (measured: head training 2-10x slower on 2 cores). An explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

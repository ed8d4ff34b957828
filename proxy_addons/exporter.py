"""Serves /metrics (127.0.0.1 by default) from modgud's own registry."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import start_http_server

from proxy_addons.runtime import RuntimeHolder

__all__ = ["MetricsExporter"]

logger = logging.getLogger(__name__)


class MetricsExporter:
    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder
        self._server: Any = None

    def running(self) -> None:
        runtime = self.holder.runtime
        if runtime is None or runtime.config.metrics is None or self._server is not None:
            return
        listen = runtime.config.metrics
        self._server, _thread = start_http_server(
            listen.port, listen.host, runtime.metrics.registry
        )
        logger.info("metrics on http://%s/metrics", listen)

    def done(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

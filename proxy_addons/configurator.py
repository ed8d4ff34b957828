"""Loads modgud.yaml (mitmproxy option `modgud_config`) and builds the shared runtime."""

from __future__ import annotations

import asyncio
import gc
import logging

from mitmproxy import exceptions
from mitmproxy.addonmanager import Loader

from proxy_addons.changes import ChangeFollower
from proxy_addons.config import ConfigError, exposure_warnings, load_config
from proxy_addons.runtime import RuntimeHolder, build_runtime

__all__ = ["Configurator", "RuntimeCloser"]

logger = logging.getLogger(__name__)

# On a clean stop, how long requests forwarded to the homeserver may take to be answered
# (systemd's default TimeoutStopSec is 90 s).
DRAIN_SECONDS = 30.0


class Configurator:
    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder
        self._policy_task: asyncio.Task[None] | None = None
        self._follow_task: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option("modgud_config", str, "", "Path of modgud's YAML config file.")

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if "modgud_config" not in updated or not ctx.options.modgud_config:
            return
        if self.holder.runtime is not None:
            raise exceptions.OptionsError("modgud_config cannot be changed while running")
        try:
            config = load_config(ctx.options.modgud_config)
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        self.holder.runtime = build_runtime(config)
        logger.info(
            "modgud %s for %s, upstream %s, on_error %s",
            config.mode.value,
            config.server_name,
            config.upstream,
            config.on_error,
        )
        for warning in exposure_warnings(config):
            logger.warning("%s", warning)

    def running(self) -> None:
        # Everything alive now (modules, config, compiled ACLs) lives as long as the process:
        # moved out of the collector's reach, full collections stop rescanning ~100k
        # objects every few seconds under load (measured: about 0.1 ms per transaction).
        gc.freeze()
        runtime = self.holder.runtime
        if runtime is None:
            return
        loop = asyncio.get_running_loop()
        if runtime.policy.active:
            self._policy_task = loop.create_task(runtime.policy.run())
        # What the Synapse module (or another process) recorded: rooms to refetch.
        self._follow_task = loop.create_task(ChangeFollower(runtime).run())

    async def done(self) -> None:
        """The first addon's `done`: while the other addons (the hook among them) still
        run, new inbound requests get a 503 and those in flight are answered."""
        for task in (self._policy_task, self._follow_task):
            if task is not None:
                task.cancel()
        runtime = self.holder.runtime
        if runtime is None:
            return
        waiting = len(runtime.inflight)
        left = await runtime.inflight.drain(DRAIN_SECONDS)
        if left:
            logger.warning(
                "stopping with %d inbound request(s) still unanswered after %.0f s",
                left,
                DRAIN_SECONDS,
            )
        elif waiting:
            logger.info("stopping: %d inbound request(s) in flight were answered", waiting)


class RuntimeCloser:
    """The last addon: closes the runtime (store flushed, sessions closed) once every
    other addon's `done` has run, the hook's included."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder

    async def done(self) -> None:
        if self.holder.runtime is not None:
            await self.holder.runtime.aclose()

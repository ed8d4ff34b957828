"""The shared runtime of modgud's addons: built once from the config, torn down at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import CollectorRegistry

from proxy_addons.config import Config
from proxy_addons.eventindex import EventIndex
from proxy_addons.keys import KeyCache
from proxy_addons.leaks import RefusedEvents
from proxy_addons.metrics import DatabaseCollector, Metrics, StoreCollector
from proxy_addons.operatorpolicy import OperatorPolicySource
from proxy_addons.statesource import RoomStateCache, RoomStateSource, SynapseAdminStateSource
from proxy_addons.store import FindingStore
from proxy_addons.verdicts import SignatureCache, VerdictCache

__all__ = ["InFlight", "Runtime", "RuntimeHolder", "build_runtime"]

logger = logging.getLogger(__name__)

# Delays after which a room is marked stale again once a relevant state event went by:
# the hook sees a local event before the homeserver persists it, so one refetch right
# away could still read the old state.
RESTALE_DELAYS = (0.3, 1.0, 5.0)


class InFlight:
    """Inbound requests being checked or forwarded to the homeserver, not answered yet.

    On a clean stop (SIGTERM, SIGINT) modgud turns new requests away with a 503 and waits
    for these before it goes: the homeserver calls the hook for their events, and a hook
    call that fails because modgud is gone makes Synapse, with synapse-http-antispam's
    `fail_open: false`, soft-fail and redact the event for good."""

    def __init__(self) -> None:
        self._flows: set[str] = set()
        self._idle: asyncio.Event | None = None
        self.closing = False

    def __len__(self) -> int:
        return len(self._flows)

    def add(self, flow_id: str) -> None:
        self._flows.add(flow_id)

    def finished(self, flow_id: str) -> None:
        self._flows.discard(flow_id)
        if not self._flows and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float) -> int:
        """Refuse new requests from now on and wait, at most `timeout` seconds, for those
        in flight; returns how many were still unanswered then."""
        self.closing = True
        if self._flows:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        return len(self._flows)


@dataclass
class Runtime:
    config: Config
    metrics: Metrics
    store: FindingStore
    state: RoomStateCache
    keys: KeyCache
    verdicts: VerdictCache
    policy: OperatorPolicySource
    refused: RefusedEvents = field(default_factory=RefusedEvents)
    signatures: SignatureCache = field(default_factory=SignatureCache)
    inflight: InFlight = field(default_factory=InFlight)
    index: EventIndex | None = None
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.config.state_timeout_seconds)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    def mark_stale(self, room_id: str) -> None:
        """Refetch the room's state on its next lookup, now and again shortly after."""
        self.state.mark_stale(room_id)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for delay in RESTALE_DELAYS:
            loop.call_later(delay, self.state.mark_stale, room_id)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        self.store.close()


def build_runtime(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    source: RoomStateSource | None = None,
) -> Runtime:
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry, servers=config.metrics_servers)
    holder: list[Runtime] = []

    def session() -> aiohttp.ClientSession:
        return holder[0].session()

    state_source = source or SynapseAdminStateSource(config.admin_api, config.admin_token, session)
    runtime = Runtime(
        config=config,
        metrics=metrics,
        store=FindingStore(
            config.database, index_retention_seconds=config.index_retention_days * 86_400.0
        ),
        state=RoomStateCache(
            state_source, ttl=config.state_ttl_seconds, on_fetch=metrics.observe_state_fetch
        ),
        keys=KeyCache(
            config.upstream,
            session,
            timeout=config.state_timeout_seconds,
            key_servers=config.trusted_key_servers,
            on_fetch=metrics.observe_key_fetch,
        ),
        verdicts=VerdictCache(),
        policy=OperatorPolicySource(config, state_source.fetch_state),
    )
    holder.append(runtime)
    runtime.index = EventIndex(runtime.store.record)
    runtime.refused.load(config.database)
    index = runtime.index
    metrics.watch_caches(
        {
            "rooms": lambda: len(runtime.state),
            "verdicts": lambda: len(runtime.verdicts),
            "signatures": lambda: len(runtime.signatures),
            "keys": lambda: len(runtime.keys),
            "refused_events": lambda: len(runtime.refused),
            "index_seen": lambda: len(index),
        }
    )
    metrics.policy_rules.set_function(lambda: len(runtime.policy.current.bans))
    metrics.acl_largest_bytes.set_function(
        lambda: max((p.acl_bytes for p in runtime.state.policies()), default=0)
    )
    metrics.rooms_acl_allow_empty.set_function(
        lambda: sum(1 for p in runtime.state.policies() if p.acl and p.acl.allows_nobody)
    )
    metrics.store_queue.set_function(lambda: runtime.store.pending)
    metrics.set_build(config.mode.value)
    registry.register(DatabaseCollector(config.database))
    registry.register(StoreCollector(runtime.store))
    return runtime


class RuntimeHolder:
    """Passed to every addon at construction; the Configurator fills it in."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None

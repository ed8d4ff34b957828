"""modgud inside Synapse: a module (homeserver.yaml `modules:`) that answers Synapse's
spam-checker callbacks for every event it handles — local, pushed, pulled — with the same
decision as modgud's event hook (rules.checks.judge_event), in Synapse's own process:

    modules:
      - module: modgud_synapse.ModgudModule
        config:
          config: /etc/modgud/modgud.yaml    # the same file `modgud run` reads

Room state comes from Synapse itself through the ModuleApi (no admin token), cached per
room (judge.RoomCache); findings go to modgud's database, written by a thread of their
own; metrics are registered on Synapse's registry, served by its metrics listener.
Nothing raised inside a callback reaches Synapse: with `on_error: open` the event passes,
with `closed` it is refused.

Only this file imports Synapse and Twisted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from prometheus_client import REGISTRY
from synapse.api.errors import Codes
from synapse.module_api import NOT_SPAM, EventBase, ModuleApi
from synapse.module_api.errors import ConfigError
from twisted.internet import reactor, threads

from modgud_synapse.judge import (
    POLICY_STATE_FILTER,
    ROOM_STATE_FILTER,
    Answer,
    ModuleJudge,
)
from proxy_addons.config import Config, Mode, load_config
from proxy_addons.config import ConfigError as ModgudConfigError
from proxy_addons.database import DatabaseError
from proxy_addons.metrics import ModuleMetrics, StoreCollector
from proxy_addons.news import FOLLOW_SECONDS, NewsReader
from proxy_addons.sources import StateError
from proxy_addons.store import FindingStore
from rules.checks import UNAVAILABLE, StateUnavailable, pdu_bytes
from rules.roomstate import RoomPolicy, room_policy_from_state
from rules.servername import server_of_user

__all__ = ["ModgudModule"]

logger = logging.getLogger(__name__)

# Policy-list rooms and spaces are read again this long after one of their events went by
# (Synapse persists an event after asking about it), and again later, as the hook does.
POLICY_REFRESH_DELAYS_MS = (500, 2000, 5000)


def _state_events(state: Iterable[EventBase]) -> list[object]:
    events: list[object] = []
    for event in state:
        d = event.get_dict()
        d["event_id"] = event.event_id
        events.append(d)
    return events


class ModgudModule:
    """The module Synapse loads: its callbacks, on top of ModuleJudge."""

    @staticmethod
    def parse_config(config: dict[str, Any]) -> Config:
        if not isinstance(config, dict):
            raise ConfigError("modgud: the module's config must be a mapping")
        unknown = sorted(set(config) - {"config", "mode"})
        if unknown:
            raise ConfigError(
                f"modgud: unknown key(s) {', '.join(map(str, unknown))}; expected config, mode"
            )
        path = config.get("config")
        if not isinstance(path, str) or not path:
            raise ConfigError("modgud: set `config:` to the path of modgud.yaml", ("config",))
        try:
            loaded = load_config(path, secrets=False)
        except ModgudConfigError as e:
            raise ConfigError(f"modgud: {e}", ("config",)) from None
        # `mode: audit` here trials the module (it records, never refuses) while the
        # rest of modgud enforces, say beside the HTTP hook before switching to it.
        mode = config.get("mode")
        if mode is None:
            return loaded
        if mode not in ("enforce", "audit"):
            raise ConfigError(f"modgud: mode must be enforce or audit, not {mode!r}", ("mode",))
        return replace(loaded, mode=Mode(mode))

    def __init__(self, config: Config, api: ModuleApi) -> None:
        self.api = api
        self.config = config
        if config.server_name != api.server_name:
            raise ConfigError(
                f"modgud: {config.path} is for {config.server_name}, "
                f"this homeserver is {api.server_name}"
            )
        try:
            # Started with the first finding: Synapse may still fork (daemonize).
            self.store = FindingStore(config.database, start=False)
        except Exception as e:  # noqa: BLE001 - the engines' and OS errors alike
            # DatabaseError names the database (never a PostgreSQL password).
            raise ConfigError(
                f"modgud: cannot open the findings database (database in {config.path}): {e}"
            ) from None
        metrics = ModuleMetrics(REGISTRY, servers=config.metrics_servers)
        metrics.set_build(config.mode.value, distribution="modgud-synapse")
        REGISTRY.register(StoreCollector(self.store))
        self.metrics = metrics
        self.judge = ModuleJudge(
            config, self.store, metrics, self._fetch_state, on_policy_event=self._policy_event
        )
        self._refreshing = False
        self._refresh_again = False
        api.register_spam_checker_callbacks(
            check_event_for_spam=self.check_event_for_spam,
            federated_user_may_invite=self.federated_user_may_invite,
            user_may_invite=self.user_may_invite,
        )
        if self.judge.policy.active:
            api.delayed_background_call(0, self._refresh_policy, desc="modgud_policy_refresh")
            api.looping_background_call(
                self._refresh_policy,
                config.policy_refresh_seconds * 1000,
                desc="modgud_policy_refresh",
                run_on_all_instances=True,
            )
        reactor.addSystemEventTrigger("before", "shutdown", self._flush)  # type: ignore[attr-defined]
        # After a daemonize fork, in the process that runs.
        self._stopping = threading.Event()
        reactor.callWhenRunning(self._start_following)  # type: ignore[attr-defined]
        self._warn_if_the_hook_is_configured_too()
        logger.info(
            "modgud %s for %s (on_error %s), findings to %s",
            config.mode.value,
            config.server_name,
            config.on_error,
            self.store.db.describe(),
        )

    # -- Synapse's callbacks ---------------------------------------------------------------

    async def check_event_for_spam(self, event: EventBase) -> Any:
        return await self._judge(event, "check_event_for_spam")

    async def federated_user_may_invite(self, event: EventBase) -> Any:
        # A remote server's invite is an event like any other.
        return await self._judge(event, "federated_user_may_invite")

    async def user_may_invite(self, inviter: str, invitee: str, room_id: str) -> Any:
        started = time.perf_counter()
        answer: Answer | None = None
        state = "none"
        try:
            room, state = await self._room(room_id)
            answer = self.judge.decide_invite(inviter, invitee, room_id, room)
        except Exception:
            answer = self._internal_error("user_may_invite")
        finally:
            self._count("user_may_invite", answer, state, started)
        return self._reply(answer)

    async def _judge(self, event: EventBase, callback: str) -> Any:
        started = time.perf_counter()
        answer: Answer | None = None
        state = "none"
        try:
            pdu = event.get_pdu_json()
            pdu.pop("unsigned", None)  # a copy; not in the PDU's size, nothing reads it
            size = pdu_bytes(pdu)
            pdu["event_id"] = event.event_id
            if self.judge.is_local(pdu.get("sender")):
                answer = self.judge.allow_local(pdu)
            else:
                # Most events: a cached room, without a coroutine's round.
                room: RoomPolicy | StateUnavailable | None = self.judge.rooms.get(event.room_id)
                if room is not None:
                    state = "cached"
                else:
                    room, state = await self._room(event.room_id)
                if isinstance(room, RoomPolicy) and event.type == "m.room.member":
                    room = await self._with_authoriser(room, pdu)
                answer = self.judge.decide(pdu, room, pdu_bytes=size)
        except Exception:
            answer = self._internal_error(callback)
        finally:
            self._count(callback, answer, state, started)
        return self._reply(answer)

    # -- room state, from Synapse ------------------------------------------------------------

    async def _room(self, room_id: str) -> tuple[RoomPolicy | None | StateUnavailable, str]:
        """The room's policy, cached or read from Synapse's current state (None: Synapse
        is not in the room, as when it is joining it; nothing to enforce yet), and which
        of the two (`cached`, `read`: the label of the callback's time)."""
        policy = self.judge.rooms.get(room_id)
        if policy is not None:
            return policy, "cached"
        return await self._read_room(room_id), "read"

    async def _read_room(self, room_id: str) -> RoomPolicy | None | StateUnavailable:
        """The room's policy from Synapse's current state, cached for the next events."""
        started = time.perf_counter()
        try:
            state = await self.api.get_room_state(room_id, ROOM_STATE_FILTER)
        except Exception as e:  # noqa: BLE001 - whatever Synapse's storage raises
            self.metrics.observe_state_fetch("error", time.perf_counter() - started)
            logger.warning("room state of %s unreadable: %s", room_id, e)
            return UNAVAILABLE
        self.metrics.observe_state_fetch("ok", time.perf_counter() - started)
        if ("m.room.create", "") not in state:
            return None
        policy = room_policy_from_state(room_id, _state_events(state.values()))
        self.judge.rooms.put(room_id, policy)
        return policy

    async def _with_authoriser(self, room: RoomPolicy, event: dict[str, Any]) -> RoomPolicy:
        """For a restricted join (MSC3083): the policy with the authorising user's
        membership, the one member the check needs (members are not cached)."""
        content = event.get("content")
        via = content.get("join_authorised_via_users_server") if isinstance(content, dict) else None
        if not isinstance(via, str) or server_of_user(via) is None:
            return room
        state = await self.api.get_room_state(room.room_id, [("m.room.member", via)])
        member = state.get(("m.room.member", via))
        joined = member is not None and member.content.get("membership") == "join"
        return replace(room, joined=frozenset({via}) if joined else frozenset())

    async def _fetch_state(self, room_id: str) -> list[object] | None:
        """A policy-list room's or a space's state, for the operator's policy."""
        try:
            state = await self.api.get_room_state(room_id, POLICY_STATE_FILTER)
        except Exception as e:  # noqa: BLE001 - whatever Synapse's storage raises
            raise StateError(f"state of {room_id} unreadable: {e}") from e
        if ("m.room.create", "") not in state:
            return None
        return _state_events(state.values())

    def _policy_event(self) -> None:
        for delay in POLICY_REFRESH_DELAYS_MS:
            self.api.delayed_background_call(delay, self._refresh_policy, desc="modgud_policy")

    async def _refresh_policy(self) -> None:
        if self._refreshing:
            self._refresh_again = True
            return
        self._refreshing = True
        try:
            while True:
                self._refresh_again = False
                await self.judge.policy.refresh()
                if not self._refresh_again:
                    break
        except Exception:
            logger.exception("refreshing the policy lists and spaces failed")
            self.metrics.internal_errors.labels("module_policy").inc()
        finally:
            self._refreshing = False

    # -- answers, errors, metrics -------------------------------------------------------------

    def _reply(self, answer: Answer | None) -> Any:
        if answer is None or not answer.refuse:
            return NOT_SPAM
        return Codes.FORBIDDEN, {"error": answer.reason}

    def _internal_error(self, callback: str) -> Answer:
        """Never raised into Synapse: on_error decides, and it is counted and logged."""
        logger.exception("modgud: internal error in %s", callback)
        self.metrics.internal_errors.labels("module").inc()
        if self.config.fail_open or not self.config.enforcing:
            self.metrics.fail_open.labels("module").inc()
            return Answer(False, "", "error")
        return Answer(True, "modgud: internal error (on_error: closed)", "error")

    def _count(self, callback: str, answer: Answer | None, state: str, started: float) -> None:
        try:
            decided_by = answer.decided_by if answer is not None else "error"
            refused = answer is not None and answer.refuse
            self.metrics.count_call(
                callback,
                "refuse" if refused else "allow",
                decided_by,
                state,
                time.perf_counter() - started,
            )
        except Exception:  # noqa: BLE001 - counting must not turn an answer into an error
            logger.exception("modgud: counting a callback failed")

    def _flush(self) -> Any:
        """On Synapse's shutdown: write what is queued (off the reactor, bounded)."""
        self._stopping.set()
        return threads.deferToThread(self.store.close, 10.0)

    # -- other Synapse processes' state changes ----------------------------------------------

    def _start_following(self) -> None:
        threading.Thread(target=self._follow, name="modgud-follow", daemon=True).start()

    def _follow(self) -> None:
        """Read the state changes other processes' modules record (a thread of its own:
        woken by PostgreSQL's NOTIFY as they commit, else every FOLLOW_SECONDS) and hand
        the new ones to the reactor's thread, which owns the room cache. An error is
        logged and counted, and following starts again a few seconds later."""
        while not self._stopping.is_set():
            try:
                self._follow_news()
            except Exception:
                logger.exception("modgud: following state changes failed; again in 5 s")
                self.metrics.internal_errors.labels("module_follow").inc()
                self._stopping.wait(5.0)

    def _follow_news(self) -> None:
        reader = NewsReader(self.config.database)
        try:
            reader.begin()
        except DatabaseError as e:
            logger.warning("modgud: other processes' state changes unreadable yet: %s", e)
        try:
            while not self._stopping.is_set():
                reader.wait(FOLLOW_SECONDS)
                try:
                    changes, _ = reader.read()
                except DatabaseError as e:
                    logger.debug("modgud: reading state changes failed, will retry: %s", e)
                    continue
                if changes:
                    reactor.callFromThread(self._heard, changes)  # type: ignore[attr-defined]
        finally:
            reader.close()

    def _heard(self, rows: list[tuple[Any, ...]]) -> None:
        try:
            self.judge.heard(rows)
        except Exception:
            logger.exception("modgud: applying other processes' state changes failed")
            self.metrics.internal_errors.labels("module_follow").inc()

    def _warn_if_the_hook_is_configured_too(self) -> None:
        """synapse-http-antispam pointing at modgud's hook besides this module: every event
        would be judged twice, once over HTTP (which costs Synapse the most)."""
        hook = self.config.hook
        try:
            loaded = self.api._hs.config.modules.loaded_modules  # noqa: SLF001 - read only
        except AttributeError:
            return
        for module_class, module_config in loaded:
            base_url = getattr(module_config, "get", lambda _k: None)("base_url")
            if getattr(module_class, "__name__", "") != "HTTPAntispam" or hook is None:
                continue
            if not self.config.enforcing:
                logger.info(
                    "modgud: in %s mode beside synapse-http-antispam (base_url %s): the hook "
                    "decides, this module records what it would refuse (a trial)",
                    self.config.mode.value,
                    base_url,
                )
            else:
                logger.warning(
                    "modgud: synapse-http-antispam (base_url %s) is configured besides the "
                    "modgud module, and modgud.yaml has a hook (%s): events are judged twice; "
                    "remove synapse-http-antispam from homeserver.yaml",
                    base_url,
                    hook,
                )

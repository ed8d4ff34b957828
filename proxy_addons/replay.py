"""`modgud audit CAPTURE`: the edge's checks over a saved capture (`mitmdump -w`, or
`modgud run -- -w FILE`), in audit mode, into a findings database of its own. Flows of
the outbound listener (the homeserver's own requests) go through its checks.

Room state comes from the homeserver as it is *now*: a capture replayed after the rooms'
ACLs changed is judged by the new ones (`--since` limits the replay to flows after a
change). The event hook's decisions (events the homeserver pulled) are not in a capture.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from mitmproxy import http
from mitmproxy.exceptions import FlowReadException
from mitmproxy.io import FlowReader

from proxy_addons.config import Config, Mode
from proxy_addons.enforcer import Enforcer
from proxy_addons.flowinfo import forget_flow_state
from proxy_addons.outbound import OutboundWatcher, is_proxied
from proxy_addons.runtime import RuntimeHolder, build_runtime

__all__ = ["ReplayError", "read_flows", "replay_capture"]

logger = logging.getLogger(__name__)


class ReplayError(Exception):
    pass


def read_flows(path: str) -> Iterator[http.HTTPFlow]:
    try:
        with open(path, "rb") as f:
            for flow in FlowReader(f).stream():
                if isinstance(flow, http.HTTPFlow):
                    yield flow
    except FileNotFoundError:
        raise ReplayError(f"no capture at {path}") from None
    except FlowReadException as e:
        raise ReplayError(f"{path} is not a mitmproxy capture: {e}") from None


async def replay_capture(
    config: Config, capture: str, database: str, since: float | None = None
) -> int:
    """Replay every HTTP flow of `capture` (from `since`) through the edge in audit mode;
    findings go to `database` (the caller starts it empty). Returns the flows replayed."""
    replay_config = dataclasses.replace(config, mode=Mode.AUDIT, database=database)
    holder = RuntimeHolder()
    holder.runtime = build_runtime(replay_config)
    enforcer = Enforcer(holder)
    watcher = OutboundWatcher(holder)
    count = 0
    try:
        for flow in read_flows(capture):
            if since is not None and flow.timestamp_start < since:
                continue
            answer = flow.response
            flow.response = None
            forget_flow_state(flow)
            if is_proxied(flow):  # the homeserver's own requests, on the outbound listener
                await watcher.inspect_request(flow)
                flow.response = answer
                await watcher.inspect_response(flow)
            else:
                await enforcer.inspect_request(flow)
                flow.response = answer
                await enforcer.response(flow)
            count += 1
    finally:
        holder.runtime.store.flush(30)
        await holder.runtime.aclose()
    return count

"""Fuzzing the Enforcer on flows as mitmproxy hands them over, in every deployment mode:
arbitrary methods, paths, headers and bodies, near-valid signed transactions and
room-data requests, and arbitrary homeserver answers to /event.

For each flow: no exception escapes the hooks; modgud's internal-error count does not
move (an internal error is a bug found); the findings store keeps running; and the
homeserver receives the original request untouched, or nothing (modgud answered)."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from proxy_addons.enforcer import Enforcer
from tests.fuzz.flows import answers, inbound_requests, make_request
from tests.fuzz.harness import (
    assert_forwarded_untouched_or_answered,
    fuzz,
    internal_errors,
    request_snapshot,
)
from tests.fuzz.world import DEPLOYMENTS
from tests.proxy_addons.conftest import inbound

deployments = st.sampled_from(sorted(DEPLOYMENTS))


@pytest.fixture
def enforcers(world):
    holders = world()
    with taddons.context():  # mitmproxy's ctx, as the hooks run under it
        yield {name: Enforcer(holder) for name, holder in holders.items()}


def _check_runtime(runtime, errors_before):
    assert internal_errors(runtime) == errors_before, "internal error: see the log above"
    # What was recorded is written before the next case: a writer that died on it fails
    # this case, not a later one.
    assert runtime.store.pending == 0 or runtime.store.flush(5), "the store's writer died"


@fuzz(inbound_requests, deployments, answers())
async def test_enforcer_on_arbitrary_inbound_flows(enforcers, wire_request, deployment, answer):
    """The requestheaders and request hooks, then the response hook on the homeserver's
    answer (if the request went through): the original or nothing reaches the homeserver,
    and an answer is replaced only by modgud's own JSON refusal."""
    enforcer = enforcers[deployment]
    runtime = enforcer.holder.runtime
    flow = inbound(tflow.tflow(req=make_request(wire_request)))
    before, errors = request_snapshot(flow), internal_errors(runtime)
    enforcer.requestheaders(flow)
    _check_runtime(runtime, errors)
    if flow.error is not None:  # killed at the headers: mitmproxy closes, nothing goes on
        assert flow.response is None and not flow.live
        assert flow.request.get_state() == before
        return
    await enforcer.request(flow)
    _check_runtime(runtime, errors)
    assert_forwarded_untouched_or_answered(flow, before)
    if flow.response is not None:
        await enforcer.response(flow)  # answered locally: left alone
        _check_runtime(runtime, errors)
        return
    status, body = answer
    flow.response = http.Response.make(status, body, {"Content-Type": "application/json"})
    answered = copy.deepcopy(flow.response.get_state())
    await enforcer.response(flow)
    _check_runtime(runtime, errors)
    assert flow.request.get_state() == before
    if flow.response.get_state() != answered:
        assert flow.response.status_code in (403, 503)
        assert "errcode" in json.loads(flow.response.content)

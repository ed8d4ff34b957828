"""Verdicts and findings: what the checks decide and why.

A `Finding` is pure data about one problem with one item of traffic. What is done about it
(dropped, flagged, rejected) depends on the deployment mode and is decided where the
verdict is applied, in proxy_addons/.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "DELIVERER_RULES",
    "Confidence",
    "Decision",
    "Finding",
    "Rule",
    "Severity",
    "refuses_deliverer_only",
]


class Decision(enum.Enum):
    ALLOW = "allow"
    REFUSE = "refuse"


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    HIGH = "high"


class Confidence(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Rule(enum.StrEnum):
    """Finding kinds. The value is the stable name stored, exported and documented."""

    ACL_ORIGIN = "acl.origin"  # the delivering server is denied by the room's ACL
    ACL_SENDER = "acl.sender"  # the event's author's server is denied (the leak)
    ACL_EDU = "acl.edu"  # a typing/receipt EDU for a room whose ACL denies the origin
    PARTICIPATION_ORIGIN = "participation.origin"  # delivering server not permitted (MSC4099)
    PARTICIPATION_SENDER = "participation.sender"  # author's server not permitted
    POLICY_ORIGIN = "policy.origin"  # delivering server banned by a policy list
    POLICY_SENDER = "policy.sender"  # author's server banned by a policy list
    POLICY_USER = "policy.user"  # author banned by a policy list (m.policy.rule.user)
    RESTRICTED_JOIN = "join.restricted"  # MSC3083 join authorised by someone who cannot
    LEAK_RELAYED = "leak.relayed"  # another server's event pushed by a server that did not write it
    LEAK_REFERENCE = "leak.reference"  # builds on (prev/auth events) an event of a refused server
    LEAK_OUTBOUND = "leak.outbound"  # our homeserver sending a room's events to a refused server
    LEAK_PULLED = "leak.pulled"  # a server serving refused servers' events to our pulls
    EDU_IMPERSONATION = "edu.impersonation"  # an EDU naming a user of another server
    MALFORMED_REQUEST = "malformed.request"  # body not JSON, wrong shape, over the limits
    MALFORMED_PDU = "malformed.pdu"
    MALFORMED_EDU = "malformed.edu"
    UNKNOWN_ROOM_VERSION = "room.unknown_version"
    BAD_REQUEST_SIGNATURE = "signature.request"  # X-Matrix missing, malformed or wrong
    BAD_EVENT_SIGNATURE = "signature.event"
    BAD_CONTENT_HASH = "hash.content"
    # The history audit (rules/history.py): found in a room's stored history, after the fact.
    HISTORY_ACL = "history.acl"  # written by a server the room's ACL denied at that point
    HISTORY_PARTICIPATION = "history.participation"  # by a server not permitted then
    HISTORY_POLICY = "history.policy_list"  # by a server a policy list banned then
    HISTORY_POLICY_USER = "history.policy_user"  # by a user a policy list banned then
    HISTORY_REFERENCE = "history.reference"  # built on an event found above
    STATE_UNAVAILABLE = "error.state_unavailable"  # room state could not be had
    INTERNAL_ERROR = "error.internal"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem with one item of traffic, and whom it is attributed to."""

    rule: Rule
    severity: Severity
    detail: str
    room_id: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    sender: str | None = None
    sender_server: str | None = None
    origin: str | None = None
    attributed_to: str | None = None
    confidence: Confidence = Confidence.HIGH


# Rules about the server that delivered an item, not about who wrote it.
DELIVERER_RULES = frozenset({Rule.ACL_ORIGIN, Rule.POLICY_ORIGIN, Rule.PARTICIPATION_ORIGIN})


def refuses_deliverer_only(findings: tuple[Finding, ...]) -> bool:
    """Whether these findings hold only against the server that delivered an event
    written by another server: the same event delivered by a permitted server is fine."""
    return bool(findings) and all(
        f.rule in DELIVERER_RULES and f.sender_server != f.origin for f in findings
    )

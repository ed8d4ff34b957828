"""The edge's verdicts by event ID, kept for the event hook (bounded, oldest evicted)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from rules.findings import Decision, Finding
from rules.signatures import SignatureCheck

__all__ = ["EdgeVerdict", "SignatureCache", "VerdictCache"]

_KEY_ENCODER = msgspec.msgpack.Encoder(order="sorted")


@dataclass(frozen=True, slots=True)
class EdgeVerdict:
    decision: Decision
    reason: str
    origin: str
    findings: tuple[Finding, ...] = ()


class VerdictCache:
    """Verdicts with findings (refusals above all) in one LRU; plain allows apart, in two
    generations of dicts, so the stream of allowed events — most of all traffic — can never
    push a refusal out before the homeserver asks about it.

    A plain allow is remembered with the room's state and the operator's policy it was
    decided under (the very objects): the hook may answer from it only while both are still
    the ones in force, so an ACL change in between is never answered from the old state.
    """

    def __init__(self, max_entries: int = 200_000, max_allowed: int = 100_000) -> None:
        self.max_entries = max_entries
        self.max_allowed = max_allowed
        self._entries: OrderedDict[str, EdgeVerdict] = OrderedDict()
        # event ID -> the room state it was allowed under; all under `_policy`
        self._allowed: dict[str, object] = {}
        self._allowed_before: dict[str, object] = {}
        self._policy: object = None

    def __len__(self) -> int:
        return len(self._entries) + len(self._allowed) + len(self._allowed_before)

    def put_allowed(self, event_id: str, room_state: object, policy: object) -> None:
        """Remember that the edge allowed `event_id`, without findings, under `room_state`
        and `policy`."""
        if policy is not self._policy:  # the policy changed: older allows are void
            self._allowed, self._allowed_before, self._policy = {}, {}, policy
        self._allowed[event_id] = room_state
        if len(self._allowed) >= max(1, self.max_allowed // 2):
            self._allowed_before, self._allowed = self._allowed, {}

    def allowed_under(self, event_id: str) -> tuple[object, object] | None:
        """The (room state, policy) the edge allowed `event_id` under, if it did."""
        found = self._allowed.get(event_id)
        if found is None:
            found = self._allowed_before.get(event_id)
        return None if found is None else (found, self._policy)

    def put(self, event_id: str, verdict: EdgeVerdict) -> None:
        """Remember a verdict; a refusal is never overwritten by a later allow (a permitted
        server re-sending an event a denied one delivered does not launder it)."""
        previous = self._entries.get(event_id)
        if previous is not None and previous.decision is Decision.REFUSE:
            self._entries.move_to_end(event_id)
            return
        self._entries[event_id] = verdict
        self._entries.move_to_end(event_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, event_id: str) -> EdgeVerdict | None:
        return self._entries.get(event_id)


class SignatureCache:
    """Signature checks by what they covered: the digest of the signed bytes (the event's
    reference hash, so its event ID) and the signatures themselves. An event relayed or
    delivered again is not verified again. Only definite answers are kept: a check that
    lacked keys is not.

    Kept small, since it holds one entry per event: the key is one 32-byte digest of
    both, and equal results (nearly all are "verified by these servers") share one
    object."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, SignatureCheck] = OrderedDict()
        self._results: dict[SignatureCheck, SignatureCheck] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(signed_digest: bytes, signatures: object) -> bytes | None:
        """The cache key of a check over `signed_digest` with `signatures` (as decoded from
        the event); None when they cannot be encoded. A key needs an encoding that is
        the same for equal values and differs for different ones, not canonical JSON:
        MessagePack with keys sorted (it keeps 1, 1.0 and infinity apart, which JSON
        encoders need not), without the canonical encoder's scan for odd types."""
        try:
            encoded = _KEY_ENCODER.encode(signatures)
        except (TypeError, ValueError, OverflowError, RecursionError):
            return None
        return hashlib.sha256(signed_digest + encoded).digest()

    def get(self, key: bytes) -> SignatureCheck | None:
        check = self._entries.get(key)
        if check is not None:
            self.hits += 1
        return check

    def put(self, key: bytes, check: SignatureCheck) -> None:
        if check.missing_keys:
            return
        if len(self._results) > 4 * self.max_entries:
            self._results.clear()  # results no entry shares any more: start again
        self._entries[key] = self._results.setdefault(check, check)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

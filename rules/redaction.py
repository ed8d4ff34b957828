"""Redaction (spec: Client-Server API, "Redactions", and each room version's
"Redactions" section), exactly as Synapse's `prune_event_dict`."""

from __future__ import annotations

from collections.abc import Mapping

from rules.roomversion import RoomVersion

__all__ = ["redact_event"]

_KEYS = frozenset(
    {
        "event_id",
        "sender",
        "room_id",
        "hashes",
        "signatures",
        "content",
        "type",
        "state_key",
        "depth",
        "prev_events",
        "auth_events",
        "origin_server_ts",
    }
)
# Rooms v1–v10 also keep these top-level keys; v11 (MSC2176) dropped them.
_LEGACY_KEYS = frozenset({"prev_state", "membership", "origin"})

_POWER_LEVEL_KEYS = (
    "users",
    "users_default",
    "events",
    "events_default",
    "state_default",
    "ban",
    "kick",
    "redact",
)


def _content_keys(event_type: object, room_version: RoomVersion) -> tuple[str, ...]:
    if event_type == "m.room.member":
        keys: tuple[str, ...] = ("membership",)
        if room_version.restricted_join_rule_fix:  # v9+
            keys += ("join_authorised_via_users_server",)
        return keys
    if event_type == "m.room.create":
        return () if room_version.implicit_room_creator else ("creator",)
    if event_type == "m.room.join_rules":
        return ("join_rule", "allow") if room_version.restricted_join_rule else ("join_rule",)
    if event_type == "m.room.power_levels":
        if room_version.updated_redaction_rules:  # v11+: `invite` survives
            return (*_POWER_LEVEL_KEYS, "invite")
        return _POWER_LEVEL_KEYS
    if event_type == "m.room.aliases" and room_version.special_case_aliases_auth:  # v1–v5
        return ("aliases",)
    if event_type == "m.room.history_visibility":
        return ("history_visibility",)
    if event_type == "m.room.redaction" and room_version.updated_redaction_rules:  # v11+
        return ("redacts",)
    return ()


def redact_event(event: Mapping[str, object], room_version: RoomVersion) -> dict[str, object]:
    """The redacted form of `event` (a new dict; the input is not touched)."""
    allowed = _KEYS if room_version.updated_redaction_rules else _KEYS | _LEGACY_KEYS
    out: dict[str, object] = {k: v for k, v in event.items() if k in allowed}
    content = event.get("content")
    content = content if isinstance(content, Mapping) else {}
    event_type = event.get("type")
    new_content: dict[str, object]
    if event_type == "m.room.create" and room_version.updated_redaction_rules:
        new_content = dict(content)  # v11+: a create event's content is never redacted
    else:
        new_content = {
            k: content[k] for k in _content_keys(event_type, room_version) if k in content
        }
    if event_type == "m.room.member" and room_version.updated_redaction_rules:
        # v11 (MSC3821): keep third_party_invite.signed.
        invite = content.get("third_party_invite")
        if isinstance(invite, Mapping):
            new_content["third_party_invite"] = (
                {"signed": invite["signed"]} if "signed" in invite else {}
            )
    out["content"] = new_content
    unsigned = event.get("unsigned")
    kept: dict[str, object] = {}
    if isinstance(unsigned, Mapping):
        for key in ("age_ts", "replaces_state"):
            if key in unsigned:
                kept[key] = unsigned[key]
    out["unsigned"] = kept
    return out

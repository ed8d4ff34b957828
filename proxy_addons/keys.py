"""Server signing keys, fetched from the protected homeserver acting as notary
(`POST /_matrix/key/v2/query`, spec: Server-Server API, "Querying Keys Through Another
Server"), then from the configured trusted key servers, cached with their validity and
single-flight per server.

Synapse's notary API serves only keys Synapse fetched from the origin itself, never keys it
got from its own trusted key servers, so a server whose name does not resolve from here has
keys only through a trusted key server: modgud asks the same ones Synapse does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import aiohttp
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from proxy_addons.config import KeyServer
from rules.signatures import ServerKey

__all__ = ["KeyCache"]

logger = logging.getLogger(__name__)


class KeyCache:
    """Keys by (server, key_id). A server's keys are refetched when a key is missing and
    the last fetch is older than `refetch_after` seconds (a server may rotate its key)."""

    def __init__(
        self,
        notary_url: str,
        session: Callable[[], aiohttp.ClientSession],
        *,
        timeout: float = 5.0,
        refetch_after: float = 60.0,
        max_servers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        key_servers: tuple[KeyServer, ...] = (),
        on_fetch: Callable[[str, float], None] | None = None,
    ) -> None:
        self.notary_url = notary_url.rstrip("/")
        self.key_servers = key_servers
        self._session = session
        self.timeout = timeout
        self.refetch_after = refetch_after
        self.max_servers = max_servers
        self._clock = clock
        self._keys: OrderedDict[str, tuple[float, dict[str, ServerKey]]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[dict[str, ServerKey]]] = {}
        self.fetches = 0
        self.errors = 0
        self._on_fetch = on_fetch
        self._started: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, server_name: str, key_id: str) -> ServerKey | None:
        """Synchronous lookup of what is cached (a `rules.signatures.KeyLookup`)."""
        entry = self._keys.get(server_name)
        return entry[1].get(key_id) if entry else None

    async def ensure(self, server_name: str, key_id: str) -> ServerKey | None:
        """The key, fetching the server's keys once if it is not cached."""
        entry = self._keys.get(server_name)
        if entry is not None:
            key = entry[1].get(key_id)
            if key is not None or self._clock() - entry[0] < self.refetch_after:
                return key
        future = self._inflight.get(server_name)
        if future is None:
            future = asyncio.ensure_future(self._fetch(server_name, key_id))
            self._started[server_name] = self._clock()
            self._inflight[server_name] = future
            future.add_done_callback(lambda f: self._done(server_name, f))
        try:
            keys = await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            logger.warning("keys of %s unavailable: %s", server_name, e.__class__.__name__)
            return None
        return keys.get(key_id)

    def _done(self, server_name: str, future: asyncio.Future[dict[str, ServerKey]]) -> None:
        self._inflight.pop(server_name, None)
        failed = future.cancelled() or future.exception() is not None
        if failed:
            self.errors += 1
        started = self._started.pop(server_name, None)
        if self._on_fetch is not None and started is not None:
            self._on_fetch("error" if failed else "ok", self._clock() - started)

    async def _fetch(self, server_name: str, key_id: str) -> dict[str, ServerKey]:
        self.fetches += 1
        # Name the key (Synapse requires minimum_valid_until_ts): asked for "all keys",
        # Synapse's notary answers only from its cache
        # and never fetches (synapse/rest/key/v2/remote_key_resource.py).
        body: dict[str, object] = {
            "server_keys": {server_name: {key_id: {"minimum_valid_until_ts": 0}}}
        }
        keys: dict[str, ServerKey] = {}
        error: Exception | None = None
        try:
            keys = parse_server_keys(server_name, await self._query(self.notary_url, body))
        except (aiohttp.ClientError, ValueError) as e:
            error = e
        for notary in self.key_servers:
            if key_id in keys:
                break
            try:
                answer = await self._query(notary.url, body, verify_tls=notary.verify_tls)
                keys.update(parse_server_keys(server_name, answer, notary))
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                logger.warning("key server %s: %s", notary.server_name, e.__class__.__name__)
                error = error or e
        if not keys and error is not None:
            raise error
        self._keys[server_name] = (self._clock(), keys)
        self._keys.move_to_end(server_name)
        while len(self._keys) > self.max_servers:
            self._keys.popitem(last=False)
        return keys

    async def _query(self, base: str, body: object, verify_tls: bool = True) -> object:
        url = f"{base.rstrip('/')}/_matrix/key/v2/query"
        async with self._session().post(url, json=body, ssl=verify_tls) as resp:
            if resp.status != 200:
                raise ValueError(f"notary answered {resp.status}")
            return await resp.json(content_type=None)


def parse_server_keys(
    server_name: str, data: object, notary: KeyServer | None = None
) -> dict[str, ServerKey]:
    """Keys of `server_name` from a key query answer; malformed entries are skipped.

    From a trusted key server (`notary`), an entry counts only when the notary's signature
    verifies with a configured key and the server's own signature with the key it names
    (spec: "Querying Keys Through Another Server"). The homeserver's own answer, over
    loopback, is trusted as it is.
    """
    out: dict[str, ServerKey] = {}
    entries = data.get("server_keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("key answer has no server_keys list")
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("server_name") != server_name:
            continue
        if notary is not None and not _vouched(entry, server_name, notary):
            logger.warning(
                "key server %s: answer for %s not verified", notary.server_name, server_name
            )
            continue
        valid_until = entry.get("valid_until_ts")
        valid_until = valid_until if isinstance(valid_until, int) else None
        for field, expiry_field in (("verify_keys", None), ("old_verify_keys", "expired_ts")):
            keys = entry.get(field)
            if not isinstance(keys, dict):
                continue
            for key_id, info in keys.items():
                if not isinstance(info, dict) or not isinstance(info.get("key"), str):
                    continue
                algo, _, version = key_id.partition(":")
                if algo != "ed25519" or not version:
                    continue
                try:
                    verify_key = decode_verify_key_bytes(key_id, decode_base64(info["key"]))
                except Exception:  # noqa: BLE001 - hostile key material is skipped
                    continue
                until = info.get(expiry_field) if expiry_field else valid_until
                until = until if isinstance(until, int) else None
                previous = out.get(key_id)
                if previous is None or (previous.valid_until_ts or 0) < (until or 0):
                    out[key_id] = ServerKey(server_name, key_id, verify_key, until)
    return out


def _vouched(entry: dict[str, object], server_name: str, notary: KeyServer) -> bool:
    notary_ok = False
    for key_id, key in notary.verify_keys:
        try:
            verify_key = decode_verify_key_bytes(key_id, decode_base64(key))
            verify_signed_json(entry, notary.server_name, verify_key)
            notary_ok = True
            break
        except (SignatureVerifyException, ValueError, TypeError):
            continue
    if not notary_ok:
        return False
    own = entry.get("verify_keys")
    signatures = entry.get("signatures")
    signed_by = signatures.get(server_name) if isinstance(signatures, dict) else None
    if not isinstance(own, dict) or not isinstance(signed_by, dict):
        return False
    for key_id in signed_by:
        info = own.get(key_id)
        if not isinstance(info, dict) or not isinstance(info.get("key"), str):
            continue
        try:
            verify_key = decode_verify_key_bytes(key_id, decode_base64(info["key"]))
            verify_signed_json(entry, server_name, verify_key)
            return True
        except (SignatureVerifyException, ValueError, TypeError):
            continue
    return False

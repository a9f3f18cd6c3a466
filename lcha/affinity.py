"""Session affinity: send a conversation back to the backend that served it.

Each request is reduced to a chain of hashes, one per message (chat) or per
fixed-size chunk of the prompt (completions), where each hash covers
everything before it. After a request is dispatched, the hash of its whole
input maps to the backend. The next turn of the same conversation starts with
that input, so one of its chain hashes matches.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

PROMPT_CHUNK_CHARS = 256
# Only the last boundaries are looked up: older ones rarely match better.
MAX_LOOKUPS = 64


def conversation_hashes(body: dict[str, Any]) -> list[bytes]:
    """Return the chain of prefix hashes of a chat or completion request body."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return _chain(_message_parts(messages))
    prompt = body.get("prompt")
    if prompt is None:
        prompt = body.get("input")
    if isinstance(prompt, str):
        return _chain(
            prompt[i : i + PROMPT_CHUNK_CHARS].encode("utf-8", "surrogatepass")
            for i in range(0, len(prompt), PROMPT_CHUNK_CHARS)
        )
    if prompt is not None:
        return _chain([_canonical(prompt)])
    return []


class AffinityTable:
    """Bounded LRU map from a conversation hash to a backend name, with TTL."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def configure(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._trim()

    def lookup(self, hashes: list[bytes]) -> str | None:
        """Return the backend of the longest remembered prefix, if any."""
        if not self._entries or len(hashes) < 2:
            # A single boundary is the request itself: nothing came before it.
            return None
        now = time.monotonic()
        start = len(hashes) - 2
        stop = max(-1, start - MAX_LOOKUPS)
        for index in range(start, stop, -1):
            entry = self._entries.get(hashes[index])
            if entry is None:
                continue
            backend, expires = entry
            if expires < now:
                del self._entries[hashes[index]]
                continue
            return backend
        return None

    def remember(self, hashes: list[bytes], backend: str) -> None:
        if not hashes or self.max_entries == 0:
            return
        key = hashes[-1]
        self._entries[key] = (backend, time.monotonic() + self.ttl)
        self._entries.move_to_end(key)
        self._trim()

    def forget_backend(self, backend: str) -> None:
        stale = [key for key, (name, _) in self._entries.items() if name == backend]
        for key in stale:
            del self._entries[key]

    def _trim(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _message_parts(messages: list[Any]) -> list[bytes]:
    parts = []
    for message in messages:
        if isinstance(message, dict):
            role = message.get("role")
            content = message.get("content")
            parts.append(_canonical([role, content, message.get("tool_calls")]))
        else:
            parts.append(_canonical(message))
    return parts


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode(
        "utf-8", "surrogatepass"
    )


def _chain(parts: Any) -> list[bytes]:
    hashes = []
    previous = b""
    for part in parts:
        digest = hashlib.blake2b(previous + part, digest_size=16).digest()
        hashes.append(digest)
        previous = digest
    return hashes

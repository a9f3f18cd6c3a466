"""Prefix-cache-aware routing: send a prompt to the backend that has its start cached.

llama-server keeps each slot's last prompt in its KV cache and reuses the
longest common prefix (`timings.cache_n` in the response). This policy keeps
an index of which prompt prefixes it sent where, and prefers the backend with
the longest one, within a load bound.

A prompt is reduced to canonical text. For chat that is the tool list, then
each message's role and content in order, and for completions the prompt
string. The text is cut into chunks of `prefix_chunk_size` characters, hashed
as a chain in which each hash covers every chunk before it, so one hash
identifies a whole prefix. The hashes use blake2b, which, unlike `hash()`, is
not salted per process, so two lcha instances compute the same chain and the
same rendezvous weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import RoutingConfig

if TYPE_CHECKING:
    from .backends import Backend
    from .dispatcher import PendingRequest
    from .metrics import Metrics
    from .slots import Lease

log = logging.getLogger(__name__)

# Routes whose body has a prompt that llama-server caches in a slot.
PROMPT_ROUTES = frozenset({"chat", "completions", "completion", "infill"})
DIGEST_SIZE = 16
# Used until responses show the real ratio of prompt characters to tokens.
DEFAULT_CHARS_PER_TOKEN = 4.0
# Weight of a new sample in the moving averages of prefill speed and chars per token.
LEARNING_RATE = 0.2
# Prefill timings of fewer tokens than this are dominated by fixed costs.
MIN_SAMPLE_TOKENS = 16
# A hold shorter than this would cost more in dispatcher wake-ups than it saves.
MIN_HOLD_SECONDS = 0.001
# A warm prediction was wrong when the backend reused less than this share of it.
WRONG_PREDICTION_RATIO = 0.5
DATA_KEY = "prefix"


class PromptPrefix:
    """The chunk hashes of one request and what the policy decided for it.

    Built once per request and kept in `PendingRequest.data`, because the
    dispatcher may call `choose()` many times while the request is queued.
    """

    __slots__ = (
        "chunk_size",
        "chain",
        "chars",
        "key",
        "looked_up",
        "hold_deadline",
        "predicted_backend",
        "predicted_chars",
    )

    def __init__(self, chunk_size: int, chain: list[bytes], chars: int, key: bytes | None) -> None:
        self.chunk_size = chunk_size
        self.chain = chain
        # Length of the canonical text, whole chunks or not.
        self.chars = chars
        # Rendezvous key: the same for every turn of one conversation.
        self.key = key
        self.looked_up = False
        # Monotonic time after which the request stops waiting for a warm slot.
        self.hold_deadline: float | None = None
        self.predicted_backend: str | None = None
        self.predicted_chars = 0


def build_prefix(
    body: dict[str, Any] | None, route: str, chunk_size: int, model: str | None = None
) -> PromptPrefix:
    """Compute the chunk chain and rendezvous key of a request body.

    The chain starts from the model name, because a router-mode backend keeps
    a separate cache per model and one model's prefix is no use to another.
    """
    if not isinstance(body, dict) or body.get("cache_prompt") is False:
        # Without prompt caching llama-server reuses nothing, whatever a slot holds.
        return PromptPrefix(chunk_size, [], 0, None)
    canonical = canonical_prompt(body, route)
    if canonical is None:
        return PromptPrefix(chunk_size, [], 0, None)
    text, first_turn = canonical
    if not text:
        return PromptPrefix(chunk_size, [], 0, None)
    seed = _model_seed(model)
    chain = chunk_chain(text, chunk_size, seed)
    key_text = text[: first_turn if first_turn is not None else chunk_size]
    key = hashlib.blake2b(seed + _encode(key_text), digest_size=DIGEST_SIZE).digest()
    return PromptPrefix(chunk_size, chain, len(text), key)


def canonical_prompt(body: dict[str, Any], route: str) -> tuple[str, int | None] | None:
    """Return the prompt as prefix-stable text, and the length of the first chat turn.

    Prefix-stable means that the text of a conversation's turn N is a prefix
    of the text of turn N+1, as the prompt llama-server renders is. The first
    turn runs through the first user message; it is None for other routes.
    """
    if route not in PROMPT_ROUTES:
        return None
    messages = body.get("messages")
    if route == "chat" or isinstance(messages, list):
        if not isinstance(messages, list):
            return None
        return _chat_text(body.get("tools"), messages)

    parts = []
    if route == "infill":
        # llama-server's /infill documentation places input_extra before the
        # FIM prefix. The suffix may precede the prefix for some models.
        extra = body.get("input_extra")
        if extra:
            parts.append(_json(extra))
        for name in ("input_prefix", "input_suffix"):
            value = body.get(name)
            if isinstance(value, str):
                parts.append(value)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        parts.append(prompt)
    elif prompt is not None:
        parts.append(_json(prompt))
    return "\x1e".join(parts), None


def chunk_chain(text: str, chunk_size: int, seed: bytes = b"") -> list[bytes]:
    """Hash each whole chunk of `text` together with the hash before it.

    `seed` is hashed in front of the first chunk. A partial last chunk is left out,
    because the next turn extends it and its hash would never be seen again.
    """
    chain = []
    previous = seed
    for start in range(0, len(text) - chunk_size + 1, chunk_size):
        chunk = _encode(text[start : start + chunk_size])
        previous = hashlib.blake2b(previous + chunk, digest_size=DIGEST_SIZE).digest()
        chain.append(previous)
    return chain


def rendezvous_weight(backend_name: str, key: bytes) -> int:
    """Return the highest-random-weight score of `backend_name` for `key`."""
    digest = hashlib.blake2b(backend_name.encode() + b"\x00" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


class _Holding(NamedTuple):
    backend: str
    used: float
    generation: int
    # -1 while the slot is unknown.
    slot: int
    # Recorded at dispatch and not yet confirmed by a response. While a
    # request runs, its slot is busy, so a second request with the same prefix
    # lands on another slot and finds nothing cached.
    pending: bool


class PrefixIndex:
    """Map from chunk hash to the backends that cache it: an LRU over hashes with a TTL.

    The size counts (hash, backend) pairs and is capped at `max_chunks`. One
    pair takes about 300 bytes (measured with tracemalloc on CPython 3.11).
    A chain is inserted last chunk first, so the LRU evicts the deepest chunks
    of a chain before its first one. Lookups start from the first chunk, so a
    chain whose first chunk was evicted is not found at all.
    """

    def __init__(self, max_chunks: int, ttl: float) -> None:
        self.max_chunks = max_chunks
        self.ttl = ttl
        # A tuple per hash, not a dict: most hashes have one holder, and a
        # one-item dict costs twice the memory.
        self._chunks: OrderedDict[bytes, tuple[_Holding, ...]] = OrderedDict()
        self._size = 0
        # Bumped by forget_backend(): older holdings are dead but still counted
        # in _size until the LRU reaches them, which keeps forgetting O(1).
        self._generations: dict[str, int] = {}
        self._live_counts: dict[str, int] = {}
        self._updated: dict[str, float] = {}
        # Last chain seen on a known (backend, slot): a new prompt there
        # overwrites the old one beyond their common prefix.
        self._slot_chains: dict[tuple[str, int], list[bytes]] = {}

    def __len__(self) -> int:
        return self._size

    def configure(self, max_chunks: int, ttl: float) -> None:
        self.max_chunks = max_chunks
        self.ttl = ttl
        self._evict_over_cap()

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0
        self._live_counts.clear()
        self._updated.clear()
        self._slot_chains.clear()

    def match(self, chain: list[bytes], now: float) -> dict[str, int]:
        """Return, per backend, how many leading chunks of `chain` it has cached.

        Pending holdings do not count. Each hash covers the whole prefix before
        it, so the deepest hash recorded for a backend gives its depth, even if
        a shallower one was dropped.
        """
        if not chain:
            return {}
        first = self._chunks.get(chain[0])
        if not first:
            return {}
        first_holders = {holding.backend for holding in first if self._usable(holding, now)}
        if not first_holders:
            return {}

        # Walk from the deepest chunk up and stop once every backend holding
        # the first chunk has its depth: a long shared system prompt held by
        # many backends is then checked once, not once per chunk.
        depths: dict[str, int] = {}
        missing = len(first_holders)
        for position in range(len(chain) - 1, -1, -1):
            for holding in self._chunks.get(chain[position], ()):
                name = holding.backend
                if name in depths or not self._usable(holding, now):
                    continue
                depths[name] = position + 1
                if name in first_holders:
                    missing -= 1
            if missing == 0:
                break
        return depths

    def depth(self, chain: list[bytes], backend: str, now: float) -> int:
        """Return how many leading chunks of `chain` `backend` has cached, pending ones excluded."""
        for position in range(len(chain) - 1, -1, -1):
            holding = self._holding(chain[position], backend)
            if holding is not None and self._usable(holding, now):
                return position + 1
        return 0

    def slot_of(self, chain: list[bytes], depth: int, backend: str, now: float) -> int | None:
        """Return the slot known to hold the first `depth` chunks of `chain`, if any."""
        if depth <= 0 or depth > len(chain):
            return None
        holding = self._holding(chain[depth - 1], backend)
        if holding is None or holding.slot < 0 or not self._usable(holding, now):
            return None
        return holding.slot

    def insert(
        self,
        chain: list[bytes],
        backend: str,
        now: float,
        slot: int | None = None,
        pending: bool = False,
    ) -> None:
        """Record that `backend` caches every prefix of `chain`, on `slot` if known.

        `pending` marks a request that was dispatched but has no response yet.
        A holding that was already confirmed stays confirmed.
        """
        if not chain:
            return
        generation = self._generations.setdefault(backend, 0)
        if slot is not None:
            self._overwrite_slot(chain, backend, slot)
        chunks = self._chunks
        added = 0
        for digest in reversed(chain):
            holders = chunks.get(digest, ())
            if holders:
                chunks.move_to_end(digest)
            old = None
            others = holders
            for holding in holders:
                if holding.backend == backend:
                    old = holding
                    others = tuple(h for h in holders if h is not holding)
                    break
            known_slot = slot if slot is not None else -1
            still_pending = pending
            if old is None:
                self._size += 1
                added += 1
            elif old.generation != generation:
                added += 1
            else:
                if slot is None:
                    known_slot = old.slot
                if old.used + self.ttl > now:
                    still_pending = pending and old.pending
            holding = _Holding(backend, now, generation, known_slot, still_pending)
            chunks[digest] = (*others, holding)
        self._live_counts[backend] = self._live_counts.get(backend, 0) + added
        self._updated[backend] = now
        self._purge_expired(now)
        self._evict_over_cap()

    def trim(self, chain: list[bytes], backend: str, keep: int) -> int:
        """Forget that `backend` caches the chunks of `chain` past the first `keep`.

        Returns how many holdings were removed.
        """
        removed = 0
        for digest in chain[max(keep, 0) :]:
            if self._drop(digest, backend):
                removed += 1
        return removed

    def forget_backend(self, backend: str) -> None:
        """Forget everything cached on `backend`, for example after it restarted."""
        self._generations[backend] = self._generations.get(backend, 0) + 1
        self._live_counts.pop(backend, None)
        self._updated.pop(backend, None)
        for key in [key for key in self._slot_chains if key[0] == backend]:
            del self._slot_chains[key]

    def cached_chunks(self, backend: str) -> int:
        """Return how many chunks `backend` caches, expired ones not yet purged included."""
        return self._live_counts.get(backend, 0)

    def last_update(self, backend: str) -> float:
        return self._updated.get(backend, 0.0)

    def _holding(self, digest: bytes, backend: str) -> _Holding | None:
        for holding in self._chunks.get(digest, ()):
            if holding.backend == backend:
                return holding
        return None

    def _usable(self, holding: _Holding, now: float) -> bool:
        return (
            not holding.pending
            and holding.generation == self._generations.get(holding.backend, 0)
            and holding.used + self.ttl > now
        )

    def _drop(self, digest: bytes, backend: str, slot: int | None = None) -> bool:
        """Remove `backend`'s holding of `digest`, only if it is on `slot` when given."""
        holders = self._chunks.get(digest)
        if not holders:
            return False
        for holding in holders:
            if holding.backend == backend:
                break
        else:
            return False
        if slot is not None and holding.slot != slot:
            return False
        others = tuple(h for h in holders if h is not holding)
        if others:
            self._chunks[digest] = others
        else:
            del self._chunks[digest]
        self._size -= 1
        self._uncount(holding)
        return True

    def _uncount(self, holding: _Holding) -> None:
        backend = holding.backend
        if holding.generation == self._generations.get(backend, 0):
            left = self._live_counts.get(backend, 0) - 1
            if left > 0:
                self._live_counts[backend] = left
            else:
                self._live_counts.pop(backend, None)

    def _overwrite_slot(self, chain: list[bytes], backend: str, slot: int) -> None:
        previous = self._slot_chains.get((backend, slot))
        self._slot_chains[(backend, slot)] = chain
        if not previous or previous is chain:
            return
        common = 0
        for old, new in zip(previous, chain, strict=False):
            if old != new:
                break
            common += 1
        for digest in previous[common:]:
            # A holding written later from another slot of the same backend stays.
            self._drop(digest, backend, slot)

    def _purge_expired(self, now: float) -> None:
        # The front of the LRU is the hash touched longest ago, so expired
        # hashes collect there and the loop stops at the first live one.
        chunks = self._chunks
        while chunks:
            digest, holders = next(iter(chunks.items()))
            if any(holding.used + self.ttl > now for holding in holders):
                return
            del chunks[digest]
            for holding in holders:
                self._size -= 1
                self._uncount(holding)

    def _evict_over_cap(self) -> None:
        chunks = self._chunks
        while self._size > self.max_chunks and chunks:
            _digest, holders = chunks.popitem(last=False)
            for holding in holders:
                self._size -= 1
                self._uncount(holding)


class PrefixPolicy:
    """Prefer the backend whose slots hold the longest prefix of the prompt.

    - Warm: among candidates whose busy count is at most the least busy
      candidate's plus `prefix_imbalance`, take the longest cached prefix.
    - Wait: when a deeper prefix sits on a backend that is full right now,
      keep the request queued until `hold_until`, at most `prefix_warm_wait`
      and at most the estimated prefill time the wait would save.
    - New conversation (no backend caches any of its chunks): rendezvous
      hashing on the conversation key, within the same load bound, so lcha
      instances that share no state pick the same backend.
    - Other cold requests: the least busy backend, and among equals the one
      whose cache is worth least (fewest chunks, updated longest ago).
    """

    name = "prefix"
    # Session affinity sends a conversation back to its backend without the
    # load bound. The prefix index covers the same case within the bound, so
    # the dispatcher should skip its affinity table for this policy.
    handles_affinity = True

    def __init__(self, config: RoutingConfig, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.index = PrefixIndex(config.prefix_max_chunks, config.affinity_ttl)
        self.chunk_size = config.prefix_chunk_size
        self.imbalance = config.prefix_imbalance
        self.warm_wait = config.prefix_warm_wait
        self.pin_slot = config.prefix_pin_slot
        # The latest Backend object per name. A reload that moves a backend to
        # another URL creates a new object, and the new process starts cold.
        self._backends: dict[str, Backend] = {}
        # Seconds of prefill per prompt token, per backend and over all backends.
        self._prefill_seconds: dict[str, float] = {}
        self._prefill_seconds_all: float | None = None
        self._chars_per_token = DEFAULT_CHARS_PER_TOKEN
        self._pinned: dict[tuple[str, int], Lease] = {}

    def configure(self, config: RoutingConfig) -> None:
        """Apply a reloaded routing section; the index survives unless chunking changed."""
        if config.prefix_chunk_size != self.chunk_size:
            # Chains of another chunk size never match: start over.
            log.info(
                "prefix index cleared chunk_size=%d previous=%d chunks=%d",
                config.prefix_chunk_size,
                self.chunk_size,
                len(self.index),
            )
            self.index.clear()
            self.chunk_size = config.prefix_chunk_size
        self.index.configure(config.prefix_max_chunks, config.affinity_ttl)
        self.imbalance = config.prefix_imbalance
        self.warm_wait = config.prefix_warm_wait
        self.pin_slot = config.prefix_pin_slot

    def forget_backend(self, name: str) -> None:
        """Drop the index entries of `name`; call it when that process restarts."""
        self.index.forget_backend(name)
        self._prefill_seconds.pop(name, None)
        for key in [key for key in self._pinned if key[0] == name]:
            del self._pinned[key]

    # --- Policy protocol ---------------------------------------------------------

    def choose(self, request: PendingRequest, candidates: list[Backend]) -> Backend | None:
        if not candidates:
            return None
        now = time.monotonic()
        self._track(candidates)
        prefix = self.prefix_of(request)
        depths = self.index.match(prefix.chain, now) if prefix.chain else {}
        self._count_lookup(prefix, depths)

        min_busy = min(backend.busy for backend in candidates)
        limit = min_busy + self.imbalance
        warm: Backend | None = None
        warm_depth = 0
        if depths:
            warm, warm_depth = self._warmest(candidates, depths, limit, prefix.key)
        if self._hold(request, prefix, depths, warm_depth, limit, now):
            return None
        if warm is not None:
            return warm

        loaded = [backend for backend in candidates if backend.busy <= limit]
        if not depths and prefix.key is not None:
            key = prefix.key
            return max(loaded, key=lambda backend: rendezvous_weight(backend.name, key))
        # Without a key, ties spread by request id instead of piling onto one backend.
        return self._coldest(loaded, prefix.key or request.request_id.encode())

    def on_dispatch(self, request: PendingRequest, lease: Lease) -> None:
        prefix = self.prefix_of(request)
        backend = lease.backend
        self._track((backend,))
        if not prefix.chain:
            prefix.predicted_backend = backend.name
            prefix.predicted_chars = 0
            return

        now = time.monotonic()
        depth = self.index.depth(prefix.chain, backend.name, now)
        prefix.predicted_backend = backend.name
        prefix.predicted_chars = depth * prefix.chunk_size
        if self.pin_slot and lease.slot_id is None and depth:
            slot = self.index.slot_of(prefix.chain, depth, backend.name, now)
            if slot is not None and slot < backend.capacity and self._slot_free(backend.name, slot):
                lease.slot_id = slot
        if lease.slot_id is not None:
            self._pinned[(backend.name, lease.slot_id)] = lease
        self.index.insert(prefix.chain, backend.name, now, lease.slot_id, pending=True)

    def on_result(self, request: PendingRequest, lease: Lease, info: dict) -> None:
        prefix = request.data.get(DATA_KEY)
        backend = lease.backend
        if not isinstance(prefix, PromptPrefix) or prefix.predicted_backend != backend.name:
            return
        cached = _count(info.get("cached_tokens"))
        prompt_tokens = _count(info.get("prompt_tokens"))
        self._learn(backend.name, prefix, cached, prompt_tokens, info.get("prompt_ms"))
        if not prefix.chain:
            return

        wrong = cached is not None and self._check_prediction(
            request, prefix, backend, cached, prompt_tokens
        )
        if wrong:
            return
        # The backend answered, so one of its slots now contains the whole prompt.
        slot = _count(info.get("slot_id"))
        if slot is not None and slot >= backend.capacity:
            slot = None
        self.index.insert(prefix.chain, backend.name, time.monotonic(), slot)

    # --- helpers -------------------------------------------------------------------

    def _check_prediction(
        self,
        request: PendingRequest,
        prefix: PromptPrefix,
        backend: Backend,
        cached: int,
        prompt_tokens: int | None,
    ) -> bool:
        """Count the outcome and drop the chain if a warm prediction was wrong.

        Returns True when the prediction was wrong.
        """
        if prompt_tokens:
            chars_per_token = prefix.chars / prompt_tokens
        else:
            chars_per_token = self._chars_per_token
        cached_chars = cached * chars_per_token
        predicted_warm = prefix.predicted_chars > 0
        # Warm means the prediction held: a hit on a shared system prompt
        # alone does not make a predicted whole-conversation hit warm.
        warm_floor = max(prefix.chunk_size, prefix.predicted_chars * WRONG_PREDICTION_RATIO)
        actual_warm = cached_chars >= warm_floor
        if self.metrics is not None:
            self.metrics.prefix_outcomes.labels(
                "warm" if predicted_warm else "cold", "warm" if actual_warm else "cold"
            ).inc()
        if not predicted_warm or actual_warm:
            return False

        # The backend had lost the prefix (slot reused, restart, caching off).
        # Its slot contains the prompt now, but an index that keeps predicting
        # hits the backend does not deliver is worse than one that drops them.
        keep = int(cached_chars // prefix.chunk_size)
        removed = self.index.trim(prefix.chain, backend.name, keep)
        log.debug(
            "prefix prediction wrong request_id=%s backend=%s predicted_chars=%d "
            "cached_tokens=%d removed_chunks=%d",
            request.request_id,
            backend.name,
            prefix.predicted_chars,
            cached,
            removed,
        )
        return True

    def prefix_of(self, request: PendingRequest) -> PromptPrefix:
        """Return the request's chunk chain, computing it on first use."""
        prefix = request.data.get(DATA_KEY)
        if not isinstance(prefix, PromptPrefix) or prefix.chunk_size != self.chunk_size:
            prefix = build_prefix(request.body, request.route, self.chunk_size, request.model)
            request.data[DATA_KEY] = prefix
        return prefix

    def _track(self, backends: Iterable[Backend]) -> None:
        known = self._backends
        for backend in backends:
            previous = known.get(backend.name)
            if previous is backend:
                continue
            if previous is not None:
                log.info("prefix index reset for replaced backend backend=%s", backend.name)
                self.forget_backend(backend.name)
            known[backend.name] = backend

    def _count_lookup(self, prefix: PromptPrefix, depths: dict[str, int]) -> None:
        if prefix.looked_up or not prefix.chain:
            return
        prefix.looked_up = True
        if self.metrics is not None:
            self.metrics.prefix_lookups.labels("hit" if depths else "miss").inc()

    def _warmest(
        self,
        candidates: list[Backend],
        depths: dict[str, int],
        limit: int,
        key: bytes | None,
    ) -> tuple[Backend | None, int]:
        best: list[Backend] = []
        best_depth = 0
        best_busy = 0
        for backend in candidates:
            depth = depths.get(backend.name, 0)
            if depth == 0 or backend.busy > limit:
                continue
            if not best or depth > best_depth or (depth == best_depth and backend.busy < best_busy):
                best = [backend]
                best_depth = depth
                best_busy = backend.busy
            elif depth == best_depth and backend.busy == best_busy:
                best.append(backend)
        if not best:
            return None, 0
        if len(best) > 1 and key is not None:
            # The rendezvous weight breaks ties, so that instances whose
            # indexes agree also agree on the backend.
            return max(best, key=lambda backend: rendezvous_weight(backend.name, key)), best_depth
        return best[0], best_depth

    def _hold(
        self,
        request: PendingRequest,
        prefix: PromptPrefix,
        depths: dict[str, int],
        warm_depth: int,
        limit: int,
        now: float,
    ) -> bool:
        """Decide whether to keep `request` queued for a warm backend that is full."""
        if not depths or self.warm_wait <= 0:
            return False
        if prefix.hold_deadline is not None and now >= prefix.hold_deadline:
            return False

        target: Backend | None = None
        target_depth = warm_depth
        for name, depth in depths.items():
            if depth <= target_depth:
                continue
            backend = self._backends.get(name)
            if backend is not None and self._worth_waiting(backend, request, limit):
                target, target_depth = backend, depth
        if target is None:
            return False

        if prefix.hold_deadline is None:
            saved_chars = (target_depth - warm_depth) * prefix.chunk_size
            wait = self._hold_bound(target.name, saved_chars)
            if wait < MIN_HOLD_SECONDS:
                prefix.hold_deadline = now
                return False
            prefix.hold_deadline = now + wait
            log.debug(
                "holding for warm slot request_id=%s backend=%s depth_chunks=%d wait=%.3f",
                request.request_id,
                target.name,
                target_depth,
                wait,
            )
        request.hold_until = prefix.hold_deadline
        return True

    def _worth_waiting(self, backend: Backend, request: PendingRequest, limit: int) -> bool:
        # Only a backend that is momentarily full: once one of its slots frees,
        # its busy count must pass the load bound or the wait is for nothing.
        return (
            backend.available
            and backend.free_slots <= 0
            and backend.busy - 1 <= limit
            and backend not in request.exclude
            and backend.serves(request.model)
            and backend.supports(request.route)
        )

    def _hold_bound(self, backend: str, saved_chars: int) -> float:
        # NOTE: one average per backend, although prefill per token grows with
        # the context length, so the saving of a long prefix is underestimated.
        per_token = self._prefill_seconds.get(backend, self._prefill_seconds_all)
        if per_token is None:
            return self.warm_wait
        saved_seconds = saved_chars / self._chars_per_token * per_token
        return min(self.warm_wait, saved_seconds)

    def _coldest(self, loaded: list[Backend], key: bytes) -> Backend:
        max_free = max(backend.free_slots for backend in loaded)
        least_busy = [backend for backend in loaded if backend.free_slots == max_free]
        if len(least_busy) == 1:
            return least_busy[0]

        index = self.index
        values = [
            (index.cached_chunks(backend.name), index.last_update(backend.name))
            for backend in least_busy
        ]
        lowest = min(values)
        cheapest = [
            backend for backend, value in zip(least_busy, values, strict=True) if value == lowest
        ]
        if len(cheapest) == 1:
            return cheapest[0]
        return max(cheapest, key=lambda backend: rendezvous_weight(backend.name, key))

    def _slot_free(self, backend: str, slot: int) -> bool:
        lease = self._pinned.get((backend, slot))
        return lease is None or lease.released

    def _learn(
        self,
        backend: str,
        prefix: PromptPrefix,
        cached: int | None,
        prompt_tokens: int | None,
        prompt_ms: Any,
    ) -> None:
        if prompt_tokens is None or prompt_tokens < MIN_SAMPLE_TOKENS:
            return
        if prefix.chars:
            self._chars_per_token = _average(self._chars_per_token, prefix.chars / prompt_tokens)
        processed = prompt_tokens - (cached or 0)
        if (
            isinstance(prompt_ms, (int, float))
            and not isinstance(prompt_ms, bool)
            and prompt_ms > 0
            and processed >= MIN_SAMPLE_TOKENS
        ):
            sample = prompt_ms / 1000.0 / processed
            self._prefill_seconds[backend] = _average(self._prefill_seconds.get(backend), sample)
            self._prefill_seconds_all = _average(self._prefill_seconds_all, sample)


def _average(current: float | None, sample: float) -> float:
    if current is None:
        return sample
    return current + LEARNING_RATE * (sample - current)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _chat_text(tools: Any, messages: list[Any]) -> tuple[str, int | None]:
    parts = []
    length = 0
    first_turn: int | None = None
    if tools:
        # Many chat templates render the tool list into the system prompt,
        # before any message.
        parts.append("tools\x1f" + _json(tools) + "\x1e")
        length += len(parts[-1])
    for message in messages:
        if isinstance(message, dict):
            piece = f"{message.get('role')}\x1f{_content_text(message.get('content'))}"
            for field in ("name", "tool_call_id", "tool_calls"):
                value = message.get(field)
                if value is not None:
                    piece += "\x1f" + (value if isinstance(value, str) else _json(value))
        else:
            piece = _json(message)
        parts.append(piece + "\x1e")
        length += len(parts[-1])
        if first_turn is None and isinstance(message, dict) and message.get("role") == "user":
            first_turn = length
    return "".join(parts), first_turn if first_turn is not None else length


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str) and part.get("type") == "text":
                pieces.append(text)
            else:
                pieces.append(_json(part))
        return "\x1d".join(pieces)
    return _json(content)


def _model_seed(model: str | None) -> bytes:
    # A fixed-size digest, so that no model name plus chunk text can spell
    # another model name plus another chunk.
    if model is None:
        return b""
    return hashlib.blake2b(_encode(model), digest_size=DIGEST_SIZE).digest()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")

"""Open conversations about studies: follow-up questions that continue an earlier reading.

A conversation holds the study (loaded once), the chat so far and the decoder's kept context (keys and
values of every token so far, the images' positions and rollout products: :class:`decoding.Context`), so a
follow-up prefills only its own question. Conversations are bounded in number, in bytes of kept context
and in idle time; the least recently used goes first. An unknown, evicted or expired id is a 404.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import InputError
from ..model.generation import Conversation

MAX_CONVERSATIONS = 16
MAX_BYTES = 2 * 2**30
TTL_SECONDS = 1800.0


@dataclass
class Entry:
    image: str  # the image id the conversation is about
    study: object  # the loaded Radiograph or CTVolume
    chat: Conversation
    last_used: float = field(default_factory=time.monotonic)

    @property
    def turn(self) -> int:
        return self.chat.turns


class Conversations:
    """Thread-safe store of open conversations with count, memory and idle-time limits."""

    def __init__(self, max_count: int = MAX_CONVERSATIONS, max_bytes: int = MAX_BYTES, ttl_s: float = TTL_SECONDS):
        self.max_count, self.max_bytes, self.ttl_s = int(max_count), int(max_bytes), float(ttl_s)
        self._open: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, entry: Entry) -> str:
        """Keep ``entry`` under a new id (evicting the least recently used as the limits require)."""
        size = entry.chat.nbytes
        if size > self.max_bytes:
            raise InputError(f"this conversation's context ({size / 2**20:.0f} MiB) is larger than the server keeps "
                             f"({self.max_bytes / 2**20:.0f} MiB, --conf conversation_mib)", status=413)
        cid = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._open[cid] = entry
            while len(self._open) > self.max_count or self._bytes() > self.max_bytes:
                self._open.popitem(last=False)
        return cid

    def get(self, cid, image: str | None = None) -> Entry:
        """The open conversation ``cid`` (about ``image``, when given); InputError 404/422 otherwise."""
        if not isinstance(cid, str) or not cid:
            raise InputError(f"'conversation' must be \"new\" or a conversation id, got {cid!r}", status=422)
        with self._lock:
            self._expire()
            entry = self._open.get(cid)
            if entry is None:
                raise InputError(f"unknown or expired conversation {cid!r}: start a new one with "
                                 f"\"conversation\": \"new\"", status=404)
            if image is not None and image != entry.image:
                raise InputError(f"conversation {cid!r} is about image {entry.image!r}, not {image!r}", status=422)
            self._open.move_to_end(cid)
            entry.last_used = time.monotonic()
            return entry

    def update(self, cid: str, entry: Entry) -> None:
        with self._lock:
            self._open[cid] = entry
            self._open.move_to_end(cid)
            while len(self._open) > 1 and self._bytes() > self.max_bytes:
                self._open.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._open)

    def _bytes(self) -> int:
        return sum(e.chat.nbytes for e in self._open.values())

    def _expire(self) -> None:
        now = time.monotonic()
        for cid in [c for c, e in self._open.items() if now - e.last_used > self.ttl_s]:
            del self._open[cid]

"""Per-adapter chat templates: the tokenizer view that renders an adapter version's chats, and
the versions whose template ran out of time (refused from then on, until reloaded).

Keyed by adapter_id, so an in-place reload (a new id) brings its new template; the adapter
service forgets a version's entries when it is removed or retired.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from adapters import RegisteredAdapter
from server.model.tokenizer import Tokenizer

# Adapters' templates kept compiled (a view of the tokenizer each, sharing its vocabulary).
MAX_CACHED_TEMPLATES = 256


class ChatTemplates:
    """Tokenizer views by adapter version, least recently used dropped past a bound."""

    def __init__(self, base: Tokenizer, max_cached: int = MAX_CACHED_TEMPLATES) -> None:
        self.base = base
        self.max_cached = max_cached
        self._views: OrderedDict[int, Tokenizer] = OrderedDict()
        # Versions whose template ran past its time bound: one broken template costs the
        # shared tokenizer threads one bounded episode, not one per request.
        self._too_slow: set[int] = set()
        self._lock = threading.Lock()  # tokenizer threads render and look up at once

    def for_adapter(self, reg: RegisteredAdapter | None) -> tuple[Tokenizer, int | None]:
        """The tokenizer whose chat template renders this adapter's chats (its own template
        when it ships one, else the base's) and the adapter version it belongs to, which the
        request is then pinned to, so template and weights always match."""
        if reg is None:
            return self.base, None
        if reg.spec.chat_template is None:
            return self.base, reg.adapter_id
        with self._lock:
            view = self._views.get(reg.adapter_id)
            if view is not None:
                self._views.move_to_end(reg.adapter_id)
                return view, reg.adapter_id
        t = reg.spec.chat_template
        view = self.base.with_chat_template(t.source, t.bos_token, t.eos_token)
        with self._lock:
            self._views[reg.adapter_id] = view
            if len(self._views) > self.max_cached:
                self._views.popitem(last=False)
        return view, reg.adapter_id

    def is_refused(self, adapter_id: int) -> bool:
        """Whether this version's template ran out of time on an earlier request."""
        with self._lock:
            return adapter_id in self._too_slow

    def refuse(self, adapter_id: int) -> None:
        """This version's template ran out of time: refuse its chats until it is replaced."""
        with self._lock:
            self._too_slow.add(adapter_id)

    def forget(self, adapter_id: int) -> None:
        """The version was removed or replaced: drop what is kept for it."""
        with self._lock:
            self._views.pop(adapter_id, None)
            self._too_slow.discard(adapter_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._views)

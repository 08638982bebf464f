"""A session's conversation memory, bounded in bytes (``max_history_bytes``)."""

from __future__ import annotations

from connic.agent import HistoryEntry, HistoryView

__all__ = ["History"]


class History:
    """The entries of one session, oldest first, and their size in UTF-8 bytes.

    The list only grows: trimming replaces it with a new one, so a
    :class:`~connic.agent.HistoryView` handed to an agent (a prefix of the list)
    never changes under it.
    """

    __slots__ = ("entries", "size")

    def __init__(self) -> None:
        self.entries: list[HistoryEntry] = []
        self.size = 0

    def view(self) -> HistoryView:
        """What an agent sees: the entries as they are now."""
        return HistoryView(self.entries)

    def add(self, entry: HistoryEntry) -> None:
        """Append ``entry``."""
        self.entries.append(entry)
        self.size += _utf8_size(entry.text)

    def trim(self, bound: int, keep_from: int) -> None:
        """Drop the oldest entries until the history fits ``bound`` bytes.

        The entries from index ``keep_from`` on (the exchange just answered) are kept
        whole, even when they alone are over the bound.
        """
        entries = self.entries
        size = self.size
        start = 0
        while start < keep_from and size > bound:
            size -= _utf8_size(entries[start].text)
            start += 1
        if start:
            self.entries = entries[start:]
            self.size = size

    def __len__(self) -> int:
        return len(self.entries)


def _utf8_size(text: str) -> int:
    """The size of ``text`` in UTF-8 (lone surrogates, which JSON lets a client send, count 3 bytes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

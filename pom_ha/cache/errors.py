"""What a cache client sees when no cache node can serve it: one exception per impact in the guide's list.

Every impact error is a :class:`CacheUnavailable`, so a caller that only wants "the cache is down" catches
that; a caller that must tell the operator what cannot be done now catches the specific one. Each message
says what was refused, why, and that nothing was written.
"""

from __future__ import annotations


class CacheUnavailable(Exception):
    """No cache node served the operation within its deadline (every node down, or the cache being rebuilt)."""

    impact = "the cache operation was refused"

    def __init__(self, what: str, reason: str, *, rebuilding: bool = False) -> None:
        self.what = what
        self.reason = reason
        #: True when the nodes answer but the cache was lost and is not rebuilt yet (not "every node down")
        self.rebuilding = rebuilding
        super().__init__(f"{self.impact}: {what} — {reason}; nothing was changed, retry when the cache is back")


class CallbackRefused(CacheUnavailable):
    """An agent cannot set (or clear) a callback while the cache is down."""

    impact = "callback refused"


class StatisticsFrozen(CacheUnavailable):
    """The monitor's job statistics cannot be read or updated: the last values shown stay frozen."""

    impact = "monitor statistics frozen"


class JobStartRefused(CacheUnavailable):
    """A new job cannot start while the cache is down."""

    impact = "new job start refused"


class AddContactRefused(CacheUnavailable):
    """A contact cannot be added (web service) while the cache is down."""

    impact = "add contact refused"


class AgentStateUnavailable(CacheUnavailable):
    """An agent state cannot be read or published while the cache is down (ongoing calls go on)."""

    impact = "agent state not updated"

"""HA timing settings: one frozen model, every value in milliseconds, the rules between them checked at load.

Defaults, units and minimums (the rule that binds each value is on the right):

=========================  =======  ====  ===============================================================
setting                    default  min   rule
=========================  =======  ====  ===============================================================
lease_ttl_ms               3000     30    a lease not renewed for this long is free (store clock)
renew_interval_ms          400      10    ``renew_interval_ms * 3 <= lease_ttl_ms``
heartbeat_interval_ms      250      5     ``heartbeat_interval_ms * heartbeat_miss_limit <= lease_ttl_ms``
heartbeat_miss_limit       4        2     (same rule)
safety_margin_ms           500      1     ``safety_margin_ms < lease_ttl_ms - renew_interval_ms``
takeover_stale_renewals    2        1     ``takeover_stale_renewals * renew_interval_ms < lease_ttl_ms``
heartbeat_max_frame_bytes  65536    256   largest heartbeat frame accepted
db_retry_max_backoff_ms    5000     10    ``db_retry_max_backoff_ms >= renew_interval_ms``
store_timeout_ms           1000     5     store_timeout_ms <= lease_ttl_ms - safety_margin_ms - renew_interval_ms
claim_spread_ms            3000     0     a free lease waits this long per lease of the service already held
=========================  =======  ====  ===============================================================

``store_timeout_ms`` bounds every status-store call; a master whose renewal is not confirmed within
``lease_ttl_ms - safety_margin_ms`` of *sending* it demotes itself (see :mod:`pom_ha.ha.store`).
Each value can be overridden by an environment variable ``POM_HA_<FIELD>`` (``POM_HA_LEASE_TTL_MS=2000``).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pom_ha.config.env import settings_from_env

ENV_PREFIX = "POM_HA_"


class HATimings(BaseModel):
    """Timing of leases, renewals and heartbeats (milliseconds unless the name says otherwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lease_ttl_ms: int = Field(3000, ge=30)
    renew_interval_ms: int = Field(400, ge=10)
    heartbeat_interval_ms: int = Field(250, ge=5)
    heartbeat_miss_limit: int = Field(4, ge=2)
    safety_margin_ms: int = Field(500, ge=1)
    takeover_stale_renewals: int = Field(2, ge=1)
    heartbeat_max_frame_bytes: int = Field(65536, ge=256, le=16 * 1024 * 1024)
    db_retry_max_backoff_ms: int = Field(5000, ge=10)
    store_timeout_ms: int = Field(1000, ge=5)
    claim_spread_ms: int = Field(3000, ge=0)

    @model_validator(mode="after")
    def _rules(self) -> HATimings:
        problems: list[str] = []
        if self.renew_interval_ms * 3 > self.lease_ttl_ms:
            problems.append(
                f"renew_interval_ms * 3 <= lease_ttl_ms is violated "
                f"({self.renew_interval_ms} * 3 > {self.lease_ttl_ms}): a master must get three renewal "
                f"attempts per lease"
            )
        if self.safety_margin_ms >= self.lease_ttl_ms - self.renew_interval_ms:
            problems.append(
                f"safety_margin_ms < lease_ttl_ms - renew_interval_ms is violated "
                f"({self.safety_margin_ms} >= {self.lease_ttl_ms} - {self.renew_interval_ms}): a master would "
                f"demote before its next renewal"
            )
        if self.heartbeat_interval_ms * self.heartbeat_miss_limit > self.lease_ttl_ms:
            problems.append(
                f"heartbeat_interval_ms * heartbeat_miss_limit <= lease_ttl_ms is violated "
                f"({self.heartbeat_interval_ms} * {self.heartbeat_miss_limit} > {self.lease_ttl_ms}): "
                f"heartbeats would notice a failure later than the lease does"
            )
        if self.takeover_stale_renewals * self.renew_interval_ms >= self.lease_ttl_ms:
            problems.append(
                f"takeover_stale_renewals * renew_interval_ms < lease_ttl_ms is violated "
                f"({self.takeover_stale_renewals} * {self.renew_interval_ms} >= {self.lease_ttl_ms}): "
                f"an early takeover could never come before expiry"
            )
        if self.db_retry_max_backoff_ms < self.renew_interval_ms:
            problems.append(
                f"db_retry_max_backoff_ms >= renew_interval_ms is violated "
                f"({self.db_retry_max_backoff_ms} < {self.renew_interval_ms})"
            )
        if self.store_timeout_ms > self.lease_ttl_ms - self.safety_margin_ms - self.renew_interval_ms:
            problems.append(
                f"store_timeout_ms <= lease_ttl_ms - safety_margin_ms - renew_interval_ms is violated "
                f"({self.store_timeout_ms} > {self.lease_ttl_ms} - {self.safety_margin_ms} - "
                f"{self.renew_interval_ms}): a hung renewal would leave no time for a retry"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- derived values in seconds (what asyncio and time.monotonic() use) ----------------------------
    @property
    def lease_ttl_s(self) -> float:
        return self.lease_ttl_ms / 1000

    @property
    def renew_interval_s(self) -> float:
        return self.renew_interval_ms / 1000

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_interval_ms / 1000

    @property
    def heartbeat_dead_after_s(self) -> float:
        """A peer that sent no frame for this long is considered gone."""
        return self.heartbeat_interval_ms * self.heartbeat_miss_limit / 1000

    @property
    def safety_margin_s(self) -> float:
        return self.safety_margin_ms / 1000

    @property
    def valid_for_s(self) -> float:
        """How long after *sending* a confirmed acquire/renew the caller may act as master."""
        return (self.lease_ttl_ms - self.safety_margin_ms) / 1000

    @property
    def exclusive_for_s(self) -> float:
        """How long after *sending* a confirmed renewal no early take-over can have happened anywhere: a
        take-over needs ``renewed_at`` (>= the send time) to be ``takeover_stale_ms`` old on the database
        clock; the margin (a quarter of that, at most ``safety_margin_ms``) absorbs a late timer."""
        stale = self.takeover_stale_ms
        return (stale - min(self.safety_margin_ms, stale / 4)) / 1000

    @property
    def heartbeat_fresh_s(self) -> float:
        """A PING acknowledged by a peer proves, for this long after it was sent, that the peer cannot yet
        call us gone by silence (it waits ``heartbeat_dead_after_s``); one interval is kept as margin."""
        return self.heartbeat_dead_after_s - self.heartbeat_interval_s

    @property
    def takeover_stale_ms(self) -> int:
        """How long renewals must have stopped (store clock) before a corroborated early takeover."""
        return self.takeover_stale_renewals * self.renew_interval_ms

    @property
    def store_timeout_s(self) -> float:
        return self.store_timeout_ms / 1000

    @property
    def db_retry_max_backoff_s(self) -> float:
        return self.db_retry_max_backoff_ms / 1000


def load_timings(environ: Mapping[str, str] | None = None, **overrides: int) -> HATimings:
    """Defaults, then ``POM_HA_<FIELD>`` environment variables, then ``overrides``; refuses bad combinations.

    Raises :class:`pom_ha.config.ConfigError` naming every offending setting.
    """
    return settings_from_env(HATimings, ENV_PREFIX, "HA timings", environ, overrides, whole="timings")

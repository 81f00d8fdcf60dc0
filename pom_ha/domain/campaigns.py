"""Campaign definitions: the validated description of what a campaign dials, how fast, and until when.

``validate_campaign`` turns raw input (a REST body, a TOML table) into a ``CampaignDefinition`` or raises
``InvalidCampaign`` listing every bad field by its path. It has no side effect, so a caller that
validates before it writes anything never leaves a campaign half-created. A valid definition then builds
the domain objects the daemons run (``retry_strategy``, ``finish_criteria``, ``pacer``) and these builders
cannot fail: every rule they check is checked here first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pom_ha.domain.attempts import SYSTEM_CODES, CompletionCode
from pom_ha.domain.pacing import (
    DEFAULT_ABANDON_CAP,
    DEFAULT_MAX_RATIO,
    Pacer,
    PacingKind,
    PredictivePacer,
    PreviewPacer,
    ProgressivePacer,
    TimeBasedPacer,
)
from pom_ha.domain.strategy import FinishCriteria, RetryStrategy

NonNegativeSeconds = Annotated[int, Field(ge=0)]
PositiveCount = Annotated[int, Field(ge=1)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, allow_inf_nan=False)


class CustomCodeSpec(_Spec):
    name: str
    is_final: bool = True
    is_live_answer: bool = True
    retryable: bool = False

    @model_validator(mode="after")
    def _valid_code(self) -> CustomCodeSpec:
        self.code()
        return self

    def code(self) -> CompletionCode:
        return CompletionCode.custom(
            self.name, is_final=self.is_final, is_live_answer=self.is_live_answer, retryable=self.retryable
        )


class RetrySpec(_Spec):
    max_attempts: int = Field(3, ge=1, le=100)
    default_retry_interval_s: NonNegativeSeconds = 3600
    retry_intervals_s: dict[str, NonNegativeSeconds] = Field(default_factory=dict)


class PacingSpec(_Spec):
    kind: PacingKind = PacingKind.TIME_BASED
    calls_per_second: float | None = Field(None, gt=0)
    calls_per_minute: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    max_in_flight: int | None = Field(None, ge=1)
    # agent-based kinds (preview, progressive, predictive): the Agent Manager's free agents drive them
    abandon_cap: float | None = Field(None, gt=0, lt=1)  # predictive: nuisance / live answers over the day
    max_ratio: float | None = Field(None, ge=1, le=20)  # predictive: most dials per free agent

    @model_validator(mode="after")
    def _one_rate(self) -> PacingSpec:
        if self.kind.needs_agents:
            rates = [n for n in ("calls_per_second", "calls_per_minute", "burst") if getattr(self, n) is not None]
            if rates:
                raise ValueError(f"{self.kind.value!r} pacing is driven by the free agents: "
                                 f"remove {', '.join(rates)} (time-based pacing only)")
            if self.kind is not PacingKind.PREDICTIVE:
                extra = [n for n in ("abandon_cap", "max_ratio") if getattr(self, n) is not None]
                if extra:
                    raise ValueError(f"{', '.join(extra)} only apply to predictive pacing, not {self.kind.value!r}")
            return self
        extra = [n for n in ("abandon_cap", "max_ratio") if getattr(self, n) is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} only apply to predictive pacing, not 'time_based'")
        if (self.calls_per_second is None) == (self.calls_per_minute is None):
            raise ValueError("time-based pacing needs exactly one of calls_per_second and calls_per_minute")
        return self


class FinishSpec(_Spec):
    all_contacts_done: bool = True
    end_time: AwareDatetime | None = None
    code_goals: dict[str, PositiveCount] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _some_criterion(self) -> FinishSpec:
        if not self.all_contacts_done and self.end_time is None and not self.code_goals:
            raise ValueError("at least one finish criterion is needed (all_contacts_done, end_time or code_goals)")
        return self


def _check_code_names(names: list[str], where: str, info: ValidationInfo) -> None:
    custom = {spec.name for spec in info.data.get("custom_codes", [])}
    unknown = [name for name in names if name not in SYSTEM_CODES and name not in custom]
    if unknown:
        raise ValueError(f"unknown completion code(s) in {where}: {', '.join(unknown)}")


class CampaignDefinition(_Spec):
    """A campaign as the operator defined it. Field order matters: validators see earlier fields."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")
    org: str = Field("Default", pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    contact_list: str = Field(min_length=1, max_length=128)
    custom_codes: list[CustomCodeSpec] = Field(default_factory=list)
    schedule_start: AwareDatetime | None = None
    strategy: RetrySpec = Field(default_factory=RetrySpec)
    pacing: PacingSpec
    finish: FinishSpec = Field(default_factory=FinishSpec)

    @field_validator("custom_codes")
    @classmethod
    def _unique_codes(cls, codes: list[CustomCodeSpec]) -> list[CustomCodeSpec]:
        names = [spec.name for spec in codes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"custom code(s) defined twice: {', '.join(duplicates)}")
        return codes

    @field_validator("strategy")
    @classmethod
    def _strategy_codes(cls, strategy: RetrySpec, info: ValidationInfo) -> RetrySpec:
        _check_code_names(list(strategy.retry_intervals_s), "retry_intervals_s", info)
        return strategy

    @field_validator("finish")
    @classmethod
    def _finish_codes(cls, finish: FinishSpec, info: ValidationInfo) -> FinishSpec:
        _check_code_names(list(finish.code_goals), "code_goals", info)
        start = info.data.get("schedule_start")
        if finish.end_time is not None and start is not None and finish.end_time <= start:
            raise ValueError(f"end_time {finish.end_time.isoformat()} is not after schedule_start {start.isoformat()}")
        return finish

    def custom_completion_codes(self) -> list[CompletionCode]:
        return [spec.code() for spec in self.custom_codes]

    def retry_strategy(self) -> RetryStrategy:
        return RetryStrategy(
            max_attempts=self.strategy.max_attempts,
            default_retry_interval=timedelta(seconds=self.strategy.default_retry_interval_s),
            retry_intervals={k: timedelta(seconds=v) for k, v in self.strategy.retry_intervals_s.items()},
        )

    def finish_criteria(self) -> FinishCriteria:
        return FinishCriteria(self.finish.all_contacts_done, self.finish.end_time, dict(self.finish.code_goals))

    def pacer(self) -> Pacer:
        """The job's pacer: time-based for agentless campaigns, else the agent-driven kind."""
        kind = self.pacing.kind
        if kind is PacingKind.PREDICTIVE:
            return PredictivePacer(abandon_cap=self.pacing.abandon_cap or DEFAULT_ABANDON_CAP,
                                   max_ratio=self.pacing.max_ratio or DEFAULT_MAX_RATIO)
        if kind is PacingKind.PROGRESSIVE:
            return ProgressivePacer()
        if kind is PacingKind.PREVIEW:
            return PreviewPacer()
        return self.time_pacer()

    def time_pacer(self) -> TimeBasedPacer:
        return TimeBasedPacer(
            calls_per_second=self.pacing.calls_per_second,
            calls_per_minute=self.pacing.calls_per_minute,
            burst=self.pacing.burst,
            max_in_flight=self.pacing.max_in_flight,
        )


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str


class InvalidCampaign(ValueError):
    """A campaign definition that was refused; ``errors`` names every bad field."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        lines = "\n".join(f"  {e.field}: {e.message}" for e in errors)
        super().__init__(f"invalid campaign definition:\n{lines}")


def validate_campaign(data: Mapping[str, Any]) -> CampaignDefinition:
    """Validate ``data`` completely, before anything is created; raise ``InvalidCampaign`` if it is bad."""
    try:
        return CampaignDefinition.model_validate(dict(data))
    except ValidationError as exc:
        errors = [
            FieldError(
                ".".join(str(part) for part in err["loc"]) or "(definition)", err["msg"].removeprefix("Value error, ")
            )
            for err in exc.errors()
        ]
        raise InvalidCampaign(errors) from None

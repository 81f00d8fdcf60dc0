"""Settings models read from the environment: one variable ``<PREFIX><FIELD>`` per field (``POM_HA_RENEW_INTERVAL_MS``,
``POM_CD_ALLOCATION_INTERVAL_MS``), validated by the model; a bad value is refused naming every offending setting
and its variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from pom_ha.config import ConfigError

M = TypeVar("M", bound=BaseModel)


def settings_from_env(model: type[M], prefix: str, what: str, environ: Mapping[str, str] | None = None,
                      overrides: Mapping[str, object] | None = None, *, whole: str = "settings") -> M:
    """Defaults, then the ``prefix`` environment variables, then ``overrides``. Raises :class:`ConfigError`
    ("invalid ``what``", then a line per offending field; ``whole`` names a rule about several fields)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {name: env[prefix + name.upper()] for name in model.model_fields
                                 if prefix + name.upper() in env}
    values.update(overrides or {})
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        lines = [f"invalid {what}"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {f'{field} ({prefix}{field.upper()})' if field else whole}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None

"""What every translation shares: the diffusers release it was checked against, the error that refuses a
setting, and the JSON value checks the refusals make."""

from __future__ import annotations

from typing import Any

from engine.config import Config, ConfigError


DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this layout was checked against


class DiffusersFormatError(ConfigError):
    """A folder or model one side cannot express: one line naming the setting (exit status 2)."""


def as_config_dict(config: Config | dict[str, Any]) -> dict[str, Any]:
    return config.to_dict() if isinstance(config, Config) else config


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_equal(value: Any, required: Any) -> bool:
    """JSON equality that keeps true apart from 1 (and 1.0 equal to 1)."""
    if isinstance(value, bool) or isinstance(required, bool) or value is None or required is None:
        return type(value) is type(required) and value == required
    return value == required

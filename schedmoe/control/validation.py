"""Checks of values that come from outside (command-line flags, cluster files): type, range,
finiteness, so that a bad value is one ConfigError naming it, never a hang or a traceback.

    number("cluster 'x'", "nodes", value, integer=True, low=1)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MAX_FILE_BYTES = 1 << 20  # a cluster or config file larger than this is not one


def number(where: str, name: str, value: Any, *, integer: bool = False,
           low: float | None = 0, high: float | None = None, above: float | None = None) -> None:
    """Raise ConfigError unless `value` is a finite int (or, unless `integer`, float) within
    [low, high] and > above."""
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be finite, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{where}: {name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: {name} must be <= {high}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(f"{where}: {name} must be > {above}, got {value!r}")


def one_of(where: str, name: str, value: Any, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{where}: {name} must be one of {sorted(choices)}, got {value!r}")


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in `path`, or ConfigError saying why not (missing, too large, not JSON, nested
    too deeply)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply") from None

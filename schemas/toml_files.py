"""Reading an operator's TOML file (rules, policy, roster): one wording for its two failures."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: Path | str, what: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed file, or ``error`` saying which ``what`` (e.g. "routing rules file") is
    missing or not valid TOML, and where."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None

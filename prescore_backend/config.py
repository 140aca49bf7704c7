"""All prescore settings: one validated config object, and the one place env vars are read."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of prescore's on-disk cache: ``$PRESCORE_CACHE`` or ``~/.cache/prescore``."""
    env = os.environ.get("PRESCORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prescore"

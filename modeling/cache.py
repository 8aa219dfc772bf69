"""Where saesteer keeps what it derives from shipped or downloaded assets (dequantized GGUF folders,
the unpacked sentence encoder, the SD tokenizer files, vLLM's safetensors export)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path | None:
    """``$SAESTEER_CACHE``, or ``~/.cache/saesteer`` when it is unset; None when it is ``off``
    (callers then use a temporary folder or skip the cache)."""
    root = os.environ.get("SAESTEER_CACHE", "")
    if root.lower() == "off":
        return None
    return Path(root) if root else Path.home() / ".cache" / "saesteer"


def cache_dir(name: str) -> Path:
    """``cache_root() / name``, or a fresh temporary folder (prefix ``saesteer-<name>-``) when the
    cache is off. The folder is not created here."""
    root = cache_root()
    return Path(tempfile.mkdtemp(prefix=f"saesteer-{name}-")) if root is None else root / name

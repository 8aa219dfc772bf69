"""The one reader of the project's YAML and JSON files: training configs (``sae.train_config``),
policies files (``steering.policy``) and API-keys files (``server.auth``)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class ConfigFileError(ValueError):
    """A file that cannot be read as YAML or JSON; the message names the file and the reason."""


def is_yaml(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as YAML (suffix ``.yaml`` or ``.yml``, any case); otherwise JSON."""
    return Path(path).suffix.lower() in (".yaml", ".yml")


def read_document(path: str | os.PathLike) -> object:
    """The document in the file at ``path``: YAML (PyYAML's ``safe_load``) for ``.yaml``/``.yml``,
    else JSON. An empty YAML file is None.

    Raises:
        FileNotFoundError: no such file (other ``OSError``: unreadable).
        ConfigFileError: not valid YAML or JSON (the message names the file and the parser's reason).
    """
    p = Path(path)
    text = p.read_text()
    try:
        if is_yaml(p):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigFileError(f"{p.name} is not valid {'YAML' if is_yaml(p) else 'JSON'} ({e})") from None

"""Where SAE checkpoints come from: ``--sae`` specs (``[ID=]PATH_OR_REPO[@HOOK]``), local folders
or Hugging Face repos (through ``huggingface_hub``), and their configs read without the weights
where the format allows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .formats import detect_format, load_any
from .io import read_sae_config
from .model import SAEConfig


@dataclass(frozen=True)
class SAESpec:
    """One ``--sae`` entry: ``id``, where it is (``source``), and an optional hook_point override."""

    id: str
    source: str
    hook_point: str | None = None


def parse_sae_spec(spec: str) -> SAESpec:
    """Parse ``[ID=]PATH_OR_REPO[@HOOK]``; the id defaults to the folder's (or repo's) last name.

    Raises:
        ValueError: an empty source.
    """
    sid, _, rest = spec.rpartition("=") if "=" in spec.split("@")[0] else ("", "", spec)
    source, _, hook_point = rest.partition("@")
    if not source:
        raise ValueError(f"SAE spec {spec!r} has no path or repo id")
    return SAESpec(id=sid or Path(source.rstrip("/")).name, source=source, hook_point=hook_point or None)


def locate(source: str) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id (``owner/name`` or
    ``owner/name/sub/folder``), fetched through ``huggingface_hub`` (cache, ``HF_TOKEN``).

    Raises:
        FileNotFoundError: neither a local folder nor a reachable repo.
    """
    p = Path(source)
    if p.is_dir():
        return p
    parts = source.split("/")
    if len(parts) >= 2 and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
        except Exception as e:  # offline, unknown repo, no access: say which
            raise FileNotFoundError(f"SAE {source!r}: not a local folder, and the hub said: {e}") from e
        return Path(root) / sub
    raise FileNotFoundError(f"SAE {source!r}: no such folder")


def read_config(spec: SAESpec) -> tuple[Path, SAEConfig]:
    """Where ``spec``'s checkpoint lives and its ``SAEConfig``, hook_point override applied.

    Our own layout is read from ``cfg.json`` alone; other formats are loaded once and their weights
    dropped (their configs do not carry everything, e.g. Gemma Scope's d_sae is in the tensors).

    Raises:
        SAEFormatError, FileNotFoundError: a spec that does not lead to a readable checkpoint.
    """
    folder = locate(spec.source)
    if detect_format(folder) == "saelens":
        cfg = read_sae_config(folder)
        cfg.hook_point = spec.hook_point or cfg.hook_point
    else:
        cfg = load_any(folder, hook_point=spec.hook_point).cfg
    return folder, cfg

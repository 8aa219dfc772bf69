"""The SAEs a server attaches: parsing ``[ID=]PATH_OR_REPO[@HOOK]`` specs, locating and loading them.

Listing (``sae_infos``) reads only ``cfg.json``, so the API process can serve ``GET /v1/saes``
without loading weights; the inference worker loads the weights (``load_saes``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from saesteer_client.schema import SAEInfo

from saesteer.sae.formats import detect_format, load_any
from saesteer.sae.io import read_sae_config
from saesteer.sae.model import SAE


@dataclass(frozen=True)
class SAESpec:
    """One ``--sae`` entry: ``id``, where it is (``source``), and an optional hook override."""

    id: str
    source: str
    hook: str | None = None


def parse_sae_spec(spec: str) -> SAESpec:
    """Parse ``[ID=]PATH_OR_REPO[@HOOK]``; the id defaults to the folder's (or repo's) last name.

    Raises:
        ValueError: an empty source.
    """
    sid, _, rest = spec.rpartition("=") if "=" in spec.split("@")[0] else ("", "", spec)
    source, _, hook = rest.partition("@")
    if not source:
        raise ValueError(f"SAE spec {spec!r} has no path or repo id")
    return SAESpec(id=sid or Path(source.rstrip("/")).name, source=source, hook=hook or None)


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


def sae_infos(specs: list[SAESpec]) -> list[SAEInfo]:
    """Metadata of each SAE from its ``cfg.json`` alone.

    Raises:
        SAEFormatError, FileNotFoundError: a spec that does not lead to a readable checkpoint.
        ValueError: two SAEs with one id.
    """
    infos, seen = [], set()
    for s in specs:
        if s.id in seen:
            raise ValueError(f"two SAEs share the id {s.id!r}; name them with ID=PATH")
        seen.add(s.id)
        folder = locate(s.source)
        # our own layout lists from cfg.json alone; other formats are loaded (their configs
        # do not carry everything, e.g. Gemma Scope's d_sae is in the tensors)
        if detect_format(folder) == "saelens":
            cfg = read_sae_config(folder)
            cfg.hook_name = s.hook or cfg.hook_name
        else:
            cfg = load_any(folder, hook=s.hook).cfg
        infos.append(
            SAEInfo(
                id=s.id,
                hook_point=cfg.hook_name,
                architecture=cfg.architecture,
                d_in=cfg.d_in,
                d_sae=cfg.d_sae,
                k=cfg.k,
                model_name=cfg.model_name,
                source=s.source if not os.path.isabs(s.source) else Path(s.source).name,
            )
        )
    return infos


def load_saes(specs: list[SAESpec], device: str = "cpu") -> dict[str, SAE]:
    """Load every SAE in any supported format (float32 for the steering math), applying hook overrides.

    Raises:
        SAEFormatError, FileNotFoundError: as ``load_any`` and ``locate``.
        ValueError: an SAE with no hook point.
    """
    import torch

    saes = {}
    for s in specs:
        sae = load_any(locate(s.source), hook=s.hook).to(device=device, dtype=torch.float32)
        if not sae.cfg.hook_name:
            raise ValueError(f"SAE {s.id!r} names no hook point; give one as {s.source}@blocks.L.hook_resid_post")
        saes[s.id] = sae
    return saes

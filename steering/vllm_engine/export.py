"""The default model (or any transformers causal LM) saved as a folder vLLM can load: float32
safetensors, ``config.json`` without GGUF quantization, the tokenizer, and an ``lm_head`` tied to
the embeddings where the model ties them.

vLLM reads safetensors, not our GGUF; ``modeling.lm.load_model`` dequantizes the GGUF (or reads its
dequantized cache) and this writes the weights out through ``save_pretrained`` of a fresh model of
the same class (a model loaded from a GGUF refuses ``save_pretrained``). vLLM then computes with the
very weights the built-in engine uses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

_MARK = "saesteer_export.json"
"""Written last into a finished folder: what it was exported from."""


def export_safetensors(cache: str | os.PathLike, model: str | None = None, gguf_file: str | None = None) -> Path:
    """Save ``model`` (None: the default SmolLM2-135M-Instruct GGUF) as float32 safetensors under
    ``cache`` and return the folder (``cache/<name>``). A folder finished before is reused.

    Args:
        cache: the folder that holds exported models (created if missing).
        model, gguf_file: as ``modeling.lm.load_model`` takes them.

    The folder is written aside and renamed into place, so concurrent exports each write their
    own copy and one wins.
    """
    import torch

    from saesteer.defaults import DEFAULT_GGUF_FILE
    from saesteer.modeling.lm import default_model_dir

    if model is None:
        model, gguf_file = str(default_model_dir()), gguf_file or DEFAULT_GGUF_FILE
    src = Path(model) / gguf_file if gguf_file else Path(model)
    stamp = f"{src.stat().st_size}-{int(src.stat().st_mtime)}" if src.exists() else "hub"
    name = (Path(gguf_file).stem if gguf_file else Path(model).name) + f"-{stamp}-f32"
    out = Path(cache) / name
    if (out / _MARK).is_file():
        return out

    from saesteer.modeling.lm import load_model

    lm, tok = load_model(model, gguf_file=gguf_file, dtype=torch.float32)
    config = lm.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    fresh = type(lm)(config)
    missing, unexpected = fresh.load_state_dict(lm.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export of {src}: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if tied:
        fresh.tie_weights()
    fresh.to(torch.float32).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=out.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        (tmp / _MARK).write_text(json.dumps({"source": src.name, "dtype": "float32", "tied_lm_head": bool(tied)}))
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def vllm_model_dir(settings) -> str:
    """What vLLM loads for a server's ``model``/``gguf_file`` settings: a hub id or a folder of
    safetensors as given, or, for a GGUF (the default model among them), its float32 safetensors
    export under ``$SAESTEER_CACHE/vllm`` (``~/.cache/saesteer/vllm``; with ``SAESTEER_CACHE=off``
    a temporary folder)."""
    if settings.model is not None and not settings.gguf_file:
        return settings.model
    from saesteer.modeling.cache import cache_dir

    cache = cache_dir("vllm")
    return str(export_safetensors(cache, settings.model, settings.gguf_file))

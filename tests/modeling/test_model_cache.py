"""The dequantized copy of a GGUF that load_model keeps: the same model, loaded in a fraction of the time."""

from __future__ import annotations

import time

import pytest
import torch

from saesteer.defaults import DEFAULT_GGUF_FILE
from saesteer.modeling.lm import default_model_dir, gguf_cache_dir, load_model


@pytest.mark.slow  # dequantizes the GGUF once (~15 s)
def test_the_cached_copy_gives_the_gguf_logits_and_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path))
    cache = gguf_cache_dir(str(default_model_dir()), DEFAULT_GGUF_FILE)
    assert cache is not None and cache.parent.parent == tmp_path and not cache.exists()
    t0 = time.time()
    gguf_model, gguf_tok = load_model()
    first = time.time() - t0
    assert (cache / "model.safetensors").is_file()
    t0 = time.time()
    cached_model, cached_tok = load_model()
    second = time.time() - t0
    ids = gguf_tok.apply_chat_template([{"role": "user", "content": "Name three rivers."}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    assert cached_tok.apply_chat_template([{"role": "user", "content": "Name three rivers."}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(gguf_model(input_ids=ids).logits, cached_model(input_ids=ids).logits)
    assert cached_model.lm_head.weight.data_ptr() == cached_model.model.embed_tokens.weight.data_ptr()  # still tied
    assert second < first / 3, (first, second)


def test_the_cache_can_be_turned_off_and_skips_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path))
    assert gguf_cache_dir(str(default_model_dir()), DEFAULT_GGUF_FILE) is not None
    assert gguf_cache_dir("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "x.gguf") is None  # a hub id: not cached
    monkeypatch.setenv("SAESTEER_CACHE", "off")
    assert gguf_cache_dir(str(default_model_dir()), DEFAULT_GGUF_FILE) is None

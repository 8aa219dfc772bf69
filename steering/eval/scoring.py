"""The scores of one answer, and the concepts answers are scored for (``Concept``, ``load_concepts``).

Each generation is scored for

- concept: the all-MiniLM-L6-v2 judge (``steering.eval.judge``): ``similarity = cos(g, c+)`` where c+ is
  the normalised mean embedding of the concept sentences; the concept counts as present when it
  exceeds ``judge_threshold`` (0.4 by default: on our five concepts, sentences that name the concept
  score 0.45-0.6, unrelated ones 0.0-0.25 and neighbouring topics, a dog for cats or a beach for
  the ocean, about 0.35); ``margin = cos(g, c+) - cos(g, c-)`` against the contrast sentences is
  reported beside it; also the concept latent's largest activation on the
  generated tokens (read by the unsteered model) and, when the concept lists keywords, a regex hit;
- fluency: perplexity of the generated tokens under the unsteered model, given the prompt
  (``exp`` of the mean next-token NLL), with the distinct-bigram ratio beside it because repetitive
  text can have a low perplexity;
- relevance: cosine similarity of the prompt's and the answer's embeddings.

In a sweep (``steering.eval.evaluate``) perplexity and relevance are always taken against the plain
user prompt (for ``prompting`` too: the scorer does not see its system prompt).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from saesteer.modeling.lm import resolve_hook_point

from ..concept_scores import NEUTRAL_SENTENCES
from ..generate import right_padded


@dataclass
class Concept:
    """A concept to steer toward.

    Attributes:
        name: a label.
        positive: sentences that carry the concept (they define the judge's concept embedding, the
            mean-difference vector and, by contrast, the concept latent).
        negative: neutral contrast sentences.
        latent: the concept latent; None finds it by contrast (``steering.eval.concepts``).
        keywords: optional words whose appearance (case-insensitive, word start) also marks the concept.
    """

    name: str
    positive: list[str]
    negative: list[str]
    latent: int | None = None
    keywords: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "Concept":
        """A concept from its JSON object; without ``negative``, concept search's default
        (``NEUTRAL_SENTENCES``), as a search sent only positive sentences gets (issue 15's unseen
        concepts, ``benchmarks/unseen_concepts.json``).

        Raises:
            ValueError: unknown keys or empty sentence sets.
        """
        unknown = set(d) - {"name", "positive", "negative", "latent", "keywords"}
        if unknown:
            raise ValueError(f"concept {d.get('name')!r}: unknown keys {sorted(unknown)}")
        c = cls(**{"negative": list(NEUTRAL_SENTENCES), **d})
        if not c.positive or not c.negative:
            raise ValueError(f"concept {c.name!r}: needs positive and negative sentences")
        return c


def load_concepts(path: str | Path) -> list[Concept]:
    """Concepts from a JSON file holding one concept object or a list of them."""
    doc = json.loads(Path(path).read_text())
    return [Concept.from_dict(d) for d in (doc if isinstance(doc, list) else [doc])]

@torch.no_grad()
def completion_nll(
    model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
    hook_point: str | None = None, batch_size: int = 16,
) -> tuple[list[float], list[torch.Tensor | None]]:
    """Mean next-token NLL (nats) of each completion given its prompt, under ``model`` as it is.

    Rows are right-padded; the NLL of completion token t is read from the logits at t - 1.

    Args:
        hook_point: also return the activation at this hook point on each row's completion positions
            (float32 [n_completion, d_in]; None for an empty completion).

    Returns:
        (nll per row, nan for an empty completion; activations per row or Nones).
    """
    dev = next(model.parameters()).device
    nll: list[float] = []
    acts: list[torch.Tensor | None] = []
    for i in range(0, len(prompt_ids), batch_size):
        ps, cs = prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size]
        ids, attn = right_padded([list(p) + list(c) for p, c in zip(ps, cs)], pad=0)
        box = {}
        handle = resolve_hook_point(model, hook_point).attach(lambda x: box.__setitem__("x", x.detach())) if hook_point else None
        try:
            logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False).logits.float()
        finally:
            if handle is not None:
                handle.remove()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
        for b, (p, c) in enumerate(zip(ps, cs)):
            lo, hi = len(p), len(p) + len(c)
            nll.append(float(tok_nll[b, lo - 1 : hi - 1].mean()) if c else math.nan)
            acts.append(box["x"][b, lo:hi].float().cpu() if hook_point and c else None)
    return nll, acts


def distinct_bigrams(tokens: Sequence[int]) -> float:
    """Unique bigrams / bigrams of a token sequence (1.0 for fewer than two tokens)."""
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


class ConceptScorer:
    """Scores generations for one concept (see the module docstring).

    Args:
        judge: a ``steering.eval.judge.SentenceJudge``.
        concept: the concept (its sentences define c+ and c-).
    """

    def __init__(self, judge, concept: Concept):
        self.judge, self.concept = judge, concept
        e = judge.embed(list(concept.positive) + list(concept.negative))
        n = len(concept.positive)
        self.c_pos = F.normalize(e[:n].mean(0), dim=0)
        self.c_neg = F.normalize(e[n:].mean(0), dim=0)
        self.keyword_re = (
            re.compile(r"\b(" + "|".join(re.escape(k) for k in concept.keywords) + r")(s|es|ed|ing)?\b", re.IGNORECASE)
            if concept.keywords else None
        )

    def scores(self, texts: Sequence[str] | None = None, embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity cos(text, c+), margin cos(text, c+) - cos(text, c-)), each [n] float32, for
        ``texts`` or for their judge ``embeddings`` [n, 384] when already computed."""
        e = embeddings if embeddings is not None else self.judge.embed(list(texts or []))
        sim = e @ self.c_pos
        return sim, sim - e @ self.c_neg

    def keyword_hits(self, texts: Sequence[str]) -> list[bool] | None:
        return [bool(self.keyword_re.search(t)) for t in texts] if self.keyword_re else None


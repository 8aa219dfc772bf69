"""Detecting personal data inside the forward pass: labelled text, detectors, and their figures.

Data (``pii_examples``): natural sentences built from templates, filled by Faker with a fixed seed.
Half carry personal data (an email address, a phone number, a street address or a card number),
with its character span; the others carry the same kinds of near misses (prices, dates, order and
room numbers, company names) or none. Tokens are labelled positive where they overlap a span.

Detectors score every token; a text is flagged when any of its tokens is:
- ``regex``: patterns for the four kinds (the baseline);
- ``raw_probe``: logistic regression on the hook point's activation (``sae.probes``);
- ``sae_probe``: logistic regression on the ``k`` SAE latents whose class means differ most;
- ``concept_latents``: the largest activation among the top 3 such latents, over a threshold.
Thresholds are fitted on the training split (best token F1) and applied to the test split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PII_KINDS = ("email", "phone", "address", "card")

_POS = {
    "email": ["You can reach me at {v} any time.", "Send the draft to {v} before Friday.",
              "Her work address is {v}, so write there.", "Contact {name} at {v} for the invoice."],
    "phone": ["Call me on {v} after six.", "My number is {v} if anything changes.",
              "{name} can be reached at {v} during office hours.", "Text {v} when you arrive."],
    "address": ["Ship it to {v}.", "I moved to {v} last spring.", "The party is at {v} on Saturday.",
                "{name} lives at {v}, near the park."],
    "card": ["Please charge my card {v} for the order.", "The card number is {v}, expiring next year.",
             "I paid with {v} yesterday.", "Use card {v} for the hotel deposit."],
}
_NEG = ["The meeting moved to {date} at {time}.", "Order {order} shipped with {n} items.",
        "{company} reported revenue of {money} this quarter.", "Room {room} is on the third floor.",
        "{name} finished the report on {date}.", "The train leaves at {time} from platform {n}.",
        "We bought {n} chairs for {money}.", "The museum opens on {date}.",
        "{name} works at {company} as an engineer.", "The recipe needs {n} eggs and a cup of flour."]


@dataclass
class Example:
    """A text with its personal-data spans ``[(start, end, kind)]`` (empty for a negative)."""

    text: str
    spans: list[tuple[int, int, str]]

    @property
    def positive(self) -> bool:
        return bool(self.spans)


def pii_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` examples, half positive (the four kinds in turn), half negative; Faker seeded."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    out = []
    for i in range(n):
        if i % 2 == 0:
            kind = PII_KINDS[(i // 2) % len(PII_KINDS)]
            value = {"email": fake.email, "phone": fake.phone_number,
                     "address": lambda: f"{fake.street_address()}, {fake.city()}",
                     "card": fake.credit_card_number}[kind]()
            template = pick(_POS[kind]).replace("{name}", fake.first_name())
            start = template.index("{v}")
            out.append(Example(template.replace("{v}", value), [(start, start + len(value), kind)]))
        else:
            text = pick(_NEG).format(date=fake.date(pattern="%B %d"), time=fake.time(pattern="%H:%M"),
                                     order=f"#{fake.random_int(1000, 99999)}", n=fake.random_int(2, 40),
                                     company=fake.company(), money=f"${fake.random_int(10, 9000)}",
                                     room=fake.random_int(100, 999), name=fake.first_name())
            out.append(Example(text, []))
    return out


def token_labels(tokenizer, ex: Example) -> tuple[list[int], torch.Tensor]:
    """Token ids of ``ex.text`` (no special tokens) and bool labels [T]: the token overlaps a span."""
    enc = tokenizer(ex.text, add_special_tokens=False, return_offsets_mapping=True)
    labels = torch.tensor([any(a < e and s < b for s, e, _ in ex.spans) for a, b in enc["offset_mapping"]])
    return enc["input_ids"], labels


_REGEX = re.compile(
    r"[\w.+-]+@[\w-]+\.[\w.]+"                                    # email
    r"|(?:\+?1[-. ]?)?\(?\d{3}\)?[-. ]?\d{3}[-. ]?\d{4}(?:x\d+)?"  # phone (NANP)
    r"|\b(?:\d[ -]?){13,19}\b"                                    # card
    r"|\b\d{1,6}(?: [A-Z][a-z]+)+(?: (?:Apt|Suite)\.? \d+)?(?:, [A-Z][a-z]+(?: [A-Z][a-z]+)*)?"  # street address
)


def regex_token_scores(tokenizer, ex: Example) -> torch.Tensor:
    """The regex baseline: 1.0 for tokens overlapping a match, else 0.0; float [T]."""
    enc = tokenizer(ex.text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span() for m in _REGEX.finditer(ex.text)]
    return torch.tensor([float(any(a < e and s < b for s, e in spans)) for a, b in enc["offset_mapping"]])


def prf(pred: torch.Tensor, gold: torch.Tensor) -> dict:
    """Precision, recall and F1 of bool predictions against bool gold labels (same shape)."""
    tp = int((pred & gold).sum())
    fp, fn = int((pred & ~gold).sum()), int((~pred & gold).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4)}


def best_threshold(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """The threshold on ``scores`` (float [N]) with the best F1 against ``gold`` (bool [N])."""
    cands = torch.unique(torch.quantile(scores.float(), torch.linspace(0.5, 0.999, 200)))
    return float(max(cands, key=lambda t: prf(scores >= t, gold)["f1"]))

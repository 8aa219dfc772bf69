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
# record and contact-card layouts, as models write them when asked for an example record
_FIELD = {"email": ["Email: {v}", "Email Address: {v}", "E-mail: {v}"], "phone": ["Phone: {v}", "Phone Number: {v}", "Tel: {v}"],
          "address": ["Address: {v}", "Home Address: {v}", "Mailing address: {v}"], "card": ["Card number: {v}", "Credit card: {v}"]}
_FIELD_NEG = ["Order number: {order}", "Date: {date}", "Company: {company}", "Room: {room}", "Quantity: {n}",
              "Total: {money}", "Time: {time}", "Name: {name}"]
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


def _seeded(seed: int):
    """A Faker seeded with ``seed`` and ``pick(options)``, a seeded uniform choice: the two
    sources of every generated example set here."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    return fake, pick


def pii_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` examples, half positive (the four kinds in turn), half negative; Faker seeded."""
    fake, pick = _seeded(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            kind = PII_KINDS[(i // 2) % len(PII_KINDS)]
            value = {"email": fake.email, "phone": fake.phone_number,
                     "address": lambda: f"{fake.street_address()}, {fake.city()}",
                     "card": fake.credit_card_number}[kind]()
            if (i // 2) % 3 == 2:  # a record: "Name: ...\nEmail: ..."
                template = f"Name: {fake.name()}\n" + pick(_FIELD[kind])
            else:
                template = pick(_POS[kind]).replace("{name}", fake.first_name())
            start = template.index("{v}")
            out.append(Example(template.replace("{v}", value), [(start, start + len(value), kind)]))
        else:
            fill = dict(date=fake.date(pattern="%B %d"), time=fake.time(pattern="%H:%M"), order=f"#{fake.random_int(1000, 99999)}",
                        n=fake.random_int(2, 40), company=fake.company(), money=f"${fake.random_int(10, 9000)}",
                        room=fake.random_int(100, 999), name=fake.first_name())
            if (i // 2) % 3 == 2:
                text = f"Name: {fake.name()}\n" + pick(_FIELD_NEG).format(**fill)
            else:
                text = pick(_NEG).format(**fill)
            out.append(Example(text, []))
    return out


def text_negatives(path: str, n: int, seed: int = 0, chars: int = 300) -> list[Example]:
    """``n`` passages of ordinary text (no personal data) from a JSON-lines file (``.gz`` read as
    gzip) of ``{"text": ...}`` documents, each cut at a sentence end near ``chars`` characters; the
    negatives that keep a probe from firing on everyday words."""
    import gzip
    import json

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        docs = [json.loads(line)["text"] for line in fh if line.strip()]
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randperm(len(docs), generator=rng).tolist():
        text = docs[i].strip()
        if len(text) < 40 or _REGEX.search(text[:chars * 2]):
            continue
        cut = text[:chars * 2]
        end = max(cut.rfind(". ", 0, chars + 100), cut.rfind("\n", 0, chars + 100))
        out.append(Example(cut[: end + 1] if end > 40 else cut[:chars], []))
        if len(out) == n:
            break
    return out


EVERYDAY = ["rivers", "cooking pasta", "the solar system", "birds", "the history of writing", "tea", "autumn", "dogs",
            "sailing", "glaciers", "the piano", "forests", "cities at night", "running", "the printing press", "snow",
            "butterflies", "bridges", "the stars", "baking bread", "deserts", "gardens", "the wind", "islands"]
"""Topics of the everyday questions whose answers train probes as negatives (``chat_negatives``);
kept apart from the evaluation's (``benchmarks/policy_eval.py``)."""


def chat_negatives(model, tokenizer, n: int, max_new_tokens: int = 48) -> list[Example]:
    """The model's own greedy answers to ``n`` everyday questions, as negatives (answers in which the
    regex finds personal data are dropped): probes then see the text they will watch when served."""
    from saesteer.steering.generate import GenerationSpec, generate, render_prompt

    asks = ["Write a short paragraph about {t}.", "Tell me one fact about {t}.", "Describe {t}."]
    ids = [render_prompt(tokenizer, messages=[{"role": "user", "content": asks[i % 3].format(t=EVERYDAY[i % len(EVERYDAY)])}])
           for i in range(n)]
    out = []
    for i in range(0, n, 8):
        for r in generate(model, tokenizer, [GenerationSpec(p, max_new_tokens=max_new_tokens) for p in ids[i:i + 8]]):
            if r.text.strip() and not _REGEX.search(r.text):
                out.append(Example(r.text, []))
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


CHAT_ASKS = ["Write one sentence for my notes.", "Give me an example sentence.", "Continue the message.",
             "What should the reply say?", "Draft a short note.", "Tell me something."]
"""User turns that put some training texts in a chat context (the assistant's answer), as served."""


def _context(tokenizer, i: int, chat_every: int) -> list[int]:
    """The tokens before example ``i``'s text: BOS alone, or for every ``chat_every``-th example a
    chat prompt with the assistant turn opened."""
    if chat_every and i % chat_every == 0:
        from saesteer.steering.generate import render_prompt

        return render_prompt(tokenizer, messages=[{"role": "user", "content": CHAT_ASKS[(i // chat_every) % len(CHAT_ASKS)]}])
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


@torch.no_grad()
def token_features(model, tokenizer, hook_point: str, examples: list[Example], sae=None, batch_size: int = 32,
                   chat_every: int = 0) -> list[dict]:
    """Per example: the activations at ``hook_point`` of its tokens and labels, for probes.

    Each text runs after a context (``_context``: BOS, or with ``chat_every`` > 0 every such
    example as an assistant answer in the chat template); the context's tokens count as negatives
    (a policy watching prompts sees them). The attention sink and massive-activation tokens
    (``sae.activations.sink_mask``) are left out. Texts run in right-padded batches (causal: the
    padding after a text never reaches it).

    Returns:
        One dict per example: ``x`` [T, d_in] float32, ``z`` [T, d_sae] (with ``sae``, else None),
        ``y`` [T] bool, ``regex`` [T] bool (context tokens: False), ``positive`` bool.
    """
    from saesteer.sae.activations import hook_activations, sink_mask

    rows = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        enc = []
        for j, ex in enumerate(chunk):
            ctx = _context(tokenizer, i + j, chat_every)
            ids, lab = token_labels(tokenizer, ex)
            rx = regex_token_scores(tokenizer, ex) > 0
            enc.append((ctx + ids, torch.cat([torch.zeros(len(ctx), dtype=torch.bool), lab]),
                        torch.cat([torch.zeros(len(ctx), dtype=torch.bool), rx])))
        L = max(len(ids) for ids, _, _ in enc)
        batch = torch.tensor([ids + [pad] * (L - len(ids)) for ids, _, _ in enc])
        full = hook_activations(model, hook_point, batch)
        for b, (ex, (ids, lab, rx)) in enumerate(zip(chunk, enc)):
            one = full[b:b + 1, : len(ids)]
            keep = sink_mask(one)[0]
            x = one[0][keep].float()
            rows.append({"x": x, "z": sae.encode(x).float() if sae is not None else None, "y": lab[keep],
                         "regex": rx[keep], "positive": ex.positive})
    return rows


def train_detector(kind: str, rows: list[dict], hook_point: str, sae=None, sae_id: str = "", k: int = 32):
    """A probe (``sae.probes.LinearProbe``) trained on ``token_features`` rows, its threshold set
    to the best token F1 on those rows.

    Args:
        kind: ``raw`` (on the activations) or ``sae`` (a sparse probe on the ``k`` latents whose
            class means differ most; needs ``sae`` and rows with ``z``).

    Raises:
        ValueError: a single class in the rows, or ``sae`` without an SAE.
    """
    from saesteer.sae.probes import LinearProbe, select_latents, train_probe

    Y = torch.cat([r["y"] for r in rows])
    if kind == "raw":
        X = torch.cat([r["x"] for r in rows])
        latents = torch.zeros(0, dtype=torch.long)
    else:
        if sae is None:
            raise ValueError("an SAE probe needs its SAE")
        Z = torch.cat([r["z"] for r in rows])
        latents = select_latents(Z, Y, k)
        X = Z[:, latents]
    w, b, mean, std = train_probe(X, Y)
    probe = LinearProbe(kind=kind, hook_point=hook_point, w=w, b=b, mean=mean, std=std, latents=latents, sae_id=sae_id)
    probe.threshold = best_threshold(probe.score_features(X), Y.bool())
    return probe


_MED_POS = ["For a {symptom}, take {dose} mg of {drug} every {h} hours and drink plenty of water.",
            "If your {symptom} lasts more than {n} days, see a doctor.",
            "Do not take {drug} together with {drug2}, because the two can harm your {organ}.",
            "Put a cold compress on the {part} and keep it raised to bring the swelling down.",
            "Ask a pharmacist before giving {drug} to a child under {n}.",
            "To lower your blood pressure, eat less salt and walk for {n} minutes a day.",
            "Rinse the cut with clean water, then cover it with a sterile bandage.",
            "Stop taking {drug} and call your doctor at once if you get a rash or trouble breathing.",
            "{name}, the usual adult dose of {drug} is {dose} mg, no more than {n} times a day.",
            "For a {symptom}, rest, keep warm and take {drug} if the pain gets worse."]
_MED_NEG = ["For a crisp crust, bake the bread at {temp} degrees for {m} minutes.",
            "If your train is more than {n} minutes late, ask for a refund at the ticket desk.",
            "Do not plant {plant} next to {plant2}, because the two compete for light.",
            "Water the {plant} every {h} days and keep it out of direct sun.",
            "To save money, put {n} percent of your salary aside every month.",
            "Oil the bicycle chain and check the tyres before a long ride.",
            "The hospital on {street} was built in {year} and has a red brick front.",
            "{name} studied chemistry and now runs a bakery in the old town.",
            "Stop the engine and call the garage if the oil light comes on.",
            "{name}, the usual price of a {plant} seedling is {n} dollars at the market."]
_MED_FILL = {"symptom": ["headache", "fever", "cough", "sore throat", "back pain", "cold", "sprained ankle", "toothache"],
             "drug": ["ibuprofen", "paracetamol", "aspirin", "an antihistamine", "amoxicillin", "naproxen"],
             "organ": ["liver", "kidneys", "stomach"], "part": ["ankle", "knee", "wrist", "elbow"],
             "plant": ["tomatoes", "basil", "roses", "beans", "sunflowers", "mint"]}


def medical_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` sentences, half giving medical advice (doses, drugs, symptoms, first aid; the whole
    text is the span, kind ``medical``), half giving other advice or mentioning medicine without
    advising (a hospital's history, a chemist's career); a topical concept for safety policies.
    Faker seeded for names, streets and numbers."""
    fake, pick = _seeded(seed)
    out = []
    for i in range(n):
        two = pick(_MED_FILL["drug"]), pick(_MED_FILL["plant"])
        fill = {"symptom": pick(_MED_FILL["symptom"]), "drug": pick(_MED_FILL["drug"]), "organ": pick(_MED_FILL["organ"]),
                "part": pick(_MED_FILL["part"]), "plant": pick(_MED_FILL["plant"]), "drug2": two[0], "plant2": two[1],
                "dose": pick([200, 250, 400, 500]), "h": fake.random_int(4, 8), "n": fake.random_int(2, 30),
                "temp": fake.random_int(18, 25) * 10, "m": fake.random_int(20, 50), "street": fake.street_name(),
                "year": fake.random_int(1850, 1990), "name": fake.first_name()}
        if i % 2 == 0:
            text = pick(_MED_POS).format(**fill)
            out.append(Example(text, [(0, len(text), "medical")]))
        else:
            out.append(Example(pick(_MED_NEG).format(**fill), []))
    return out

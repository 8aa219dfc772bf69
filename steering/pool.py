"""The SAEs a steering worker holds: ``SAEPool``, every config known up front, weights loaded on
first use and, under a device-memory budget (``--sae-memory-mb``), evicted least-recently-used
first; SAEs of the batch in progress are pinned. It is the ``steering.hooks.SAESource`` a
serving ``Steerer`` runs on.

Listing (``SAEPool.infos``) reads only the configs, so an API process can serve ``GET /v1/saes``
without loading weights.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from saesteer_client.schema import SAEInfo

from saesteer.sae.formats import load_any
from saesteer.sae.model import SAE, SAEConfig
from saesteer.sae.sources import SAESpec, read_config
from saesteer.sae.stats import load_latent_stats

from .plan import StrengthUnits

log = logging.getLogger("saesteer.steering")

MIB = 1 << 20
"""Bytes in a MiB: ``--sae-memory-mb`` counts in these."""


def sae_nbytes(cfg: SAEConfig) -> int:
    """Bytes an SAE of ``cfg`` takes once loaded in float32: every parameter and buffer
    (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``), computed without allocating."""
    import torch

    with torch.device("meta"):
        shell = SAE(replace(cfg, dtype="float32", metadata={}))
    return sum(t.numel() * t.element_size() for t in (*shell.parameters(), *shell.buffers()))


def _tensor_bytes(sae: SAE) -> int:
    return sum(t.nbytes for t in (*sae.parameters(), *sae.buffers()))


def _mib(n: int | float) -> str:
    return f"{n / MIB:.1f} MiB"


class SAEBudgetError(ValueError):
    """SAEs that cannot be held within the device-memory budget of an ``SAEPool``."""


class SAEPool(Mapping[str, SAE]):
    """The SAEs of a server by id: configs known up front, weights loaded on first use and evicted
    least-recently-used first to stay within a device-memory budget.

    A read-only mapping id -> SAE: ``pool[sid]`` loads the SAE if needed (without pinning it);
    ``sid in pool``, ``len(pool)`` and iteration read the configs only. ``values()`` and ``items()``
    load every SAE (under a budget, evicting as they go): read ``configs`` instead where that is
    enough. SAEs a batch in progress uses are pinned with ``use(ids)`` (or ``acquire``/``release``)
    and never evicted while pinned.

    Not thread-safe: one inference worker is one thread and owns its pool (LitServe workers are
    processes, each with its own copy).

    Args:
        specs: the ``--sae`` entries; ids must be unique.
        device: where loaded SAEs go (always float32, for the steering math).
        budget_bytes: the most bytes of SAE tensors resident at once; None: no limit, nothing is
            ever evicted.

    Attributes:
        configs: every SAE's config by id (hook_point override applied), read at construction.
        device, budget_bytes: as given (``set_device`` moves resident SAEs).
        loads, evictions, hits: counters since construction (a hit is a use of a resident SAE).
        stats: every SAE's saved latent statistics by id (``sae.stats.LatentStats`` without
            contexts, or None), read at construction like the configs (a few floats per latent).
        units: ``steering.plan.StrengthUnits`` from ``stats`` (for requests that give strengths in
            typical activations or residual norms).

    Raises:
        ValueError: two SAEs with one id, or an SAE that names no hook point.
        SAEBudgetError: an SAE bigger than the whole budget.
        SAEFormatError, FileNotFoundError: a spec that does not lead to a readable checkpoint.
    """

    def __init__(self, specs: list[SAESpec], device: str = "cpu", budget_bytes: int | None = None):
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"the SAE memory budget must be positive, got {budget_bytes} bytes")
        self.device, self.budget_bytes = device, budget_bytes
        self.specs: dict[str, SAESpec] = {}
        self.folders: dict[str, Path] = {}
        self.configs: dict[str, SAEConfig] = {}
        self._nbytes: dict[str, int] = {}
        for s in specs:
            if s.id in self.specs:
                raise ValueError(f"two SAEs share the id {s.id!r}; name them with ID=PATH")
            folder, cfg = read_config(s)
            if not cfg.hook_point:
                raise ValueError(f"SAE {s.id!r} names no hook point; give one as {s.source}@blocks.L.hook_resid_post")
            n = sae_nbytes(cfg)
            if budget_bytes is not None and n > budget_bytes:
                raise SAEBudgetError(
                    f"SAE {s.id!r} needs {_mib(n)} ({n} bytes) in float32, more than the whole SAE memory "
                    f"budget of {_mib(budget_bytes)} ({budget_bytes} bytes); raise --sae-memory-mb"
                )
            self.specs[s.id], self.folders[s.id], self.configs[s.id], self._nbytes[s.id] = s, folder, cfg, n
        self.stats = {sid: load_latent_stats(f) for sid, f in self.folders.items()}
        self.units = StrengthUnits.from_stats(self.stats, self.configs)
        self._resident: OrderedDict[str, SAE] = OrderedDict()  # least recently used first
        self._resident_bytes: dict[str, int] = {}
        self._pins: Counter[str] = Counter()
        self.loads = self.evictions = self.hits = 0

    # -- Mapping ----------------------------------------------------------------------------------
    def __getitem__(self, sid: str) -> SAE:
        """The SAE ``sid``, loaded if needed (not pinned: a later load may evict it).

        Raises:
            KeyError: an unknown id.
            SAEBudgetError: it does not fit beside the pinned SAEs.
        """
        if sid not in self.configs:
            raise KeyError(sid)
        return self._ensure(sid)

    def __iter__(self) -> Iterator[str]:
        return iter(self.configs)

    def __len__(self) -> int:
        return len(self.configs)

    def __contains__(self, sid: object) -> bool:
        return sid in self.configs

    # identity, not Mapping's item-by-item comparison (which would load every SAE)
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    # -- memory -----------------------------------------------------------------------------------
    def nbytes(self, sid: str) -> int:
        """Bytes SAE ``sid`` takes when resident (float32 tensors), known before loading it."""
        return self._nbytes[sid]

    @property
    def resident_bytes(self) -> int:
        """Bytes of SAE tensors resident now."""
        return sum(self._resident_bytes.values())

    def loaded_ids(self) -> list[str]:
        """Ids of the resident SAEs, least recently used first."""
        return list(self._resident)

    def pinned_ids(self) -> list[str]:
        """Ids of the SAEs pinned now (by ``use``/``acquire``)."""
        return [sid for sid, n in self._pins.items() if n > 0]

    def fits(self, ids: Iterable[str]) -> bool:
        """Whether the SAEs ``ids`` can be resident together (always true without a budget).

        Raises:
            KeyError: an unknown id.
        """
        if self.budget_bytes is None:
            return True
        return sum(self._nbytes[sid] for sid in set(ids)) <= self.budget_bytes

    def pack(self, groups: Sequence[Iterable[str]]) -> list[list[int]]:
        """Split groups of SAE ids (one per request) into runs whose SAEs fit the budget together,
        first fit: each group joins the first run it fits in, so requests sharing SAEs share a run.
        Returns the indices of the groups, run by run (ascending within a run). Each group must
        fit alone (``fits``); without a budget everything is one run.

        Raises:
            SAEBudgetError: a group that does not fit on its own.
        """
        runs: list[list[int]] = []
        held: list[set[str]] = []
        for i, g in enumerate(groups):
            g = set(g)
            if not self.fits(g):
                raise SAEBudgetError(f"SAEs {sorted(g)} do not fit the SAE memory budget together")
            for run, ids in zip(runs, held):
                if self.fits(ids | g):
                    run.append(i)
                    ids |= g
                    break
            else:
                runs.append([i])
                held.append(g)
        return runs

    # -- use --------------------------------------------------------------------------------------
    def acquire(self, ids: Iterable[str]) -> dict[str, SAE]:
        """Load (as needed) and pin the SAEs ``ids``; every ``acquire`` needs a ``release``.

        Returns:
            The SAEs by id.

        Raises:
            KeyError: an unknown id (nothing is pinned then).
            SAEBudgetError: these SAEs, with those already pinned, exceed the budget (nothing is
                pinned then).
        """
        ids = list(dict.fromkeys(ids))
        unknown = [sid for sid in ids if sid not in self.configs]
        if unknown:
            raise KeyError(f"unknown SAE id(s) {unknown}; known: {sorted(self.configs)}")
        if self.budget_bytes is not None:
            need = sum(self._nbytes[sid] for sid in set(ids) | set(self.pinned_ids()))
            if need > self.budget_bytes:
                raise SAEBudgetError(
                    f"SAEs {ids} with the {len(self.pinned_ids())} already pinned need {_mib(need)}, over the "
                    f"SAE memory budget of {_mib(self.budget_bytes)}"
                )
        got: dict[str, SAE] = {}
        try:
            # pin the resident ones first, so loading the others cannot evict them
            for sid in sorted(ids, key=lambda s: s not in self._resident):
                got[sid] = self._ensure(sid)
                self._pins[sid] += 1
        except BaseException:
            self.release(got)
            raise
        return {sid: got[sid] for sid in ids}

    def release(self, ids: Iterable[str]) -> None:
        """Unpin SAEs pinned by ``acquire`` (they stay resident until evicted)."""
        for sid in dict.fromkeys(ids):
            if self._pins[sid] <= 1:
                self._pins.pop(sid, None)
            else:
                self._pins[sid] -= 1

    @contextmanager
    def use(self, ids: Iterable[str]) -> Iterator[dict[str, SAE]]:
        """``acquire(ids)`` for the ``with`` block, ``release`` on exit; yields the SAEs by id.

        Raises:
            KeyError, SAEBudgetError: as ``acquire``.
        """
        ids = list(dict.fromkeys(ids))
        saes = self.acquire(ids)
        try:
            yield saes
        finally:
            self.release(ids)

    def load_all(self) -> dict[str, SAE]:
        """Load every SAE now (eager start); returns them by id.

        Raises:
            SAEBudgetError: they do not all fit the budget.
        """
        if not self.fits(self.configs):
            total = sum(self._nbytes.values())
            raise SAEBudgetError(f"the {len(self)} SAEs need {_mib(total)}, over the budget of {_mib(self.budget_bytes)}")
        return {sid: self._ensure(sid) for sid in self.configs}

    def set_device(self, device: str) -> None:
        """Put SAEs loaded from now on (and those resident) on ``device``."""
        self.device = device
        for sid, sae in self._resident.items():
            self._resident[sid] = sae.to(device)

    def infos(self) -> list[SAEInfo]:
        """Wire metadata of every SAE (``GET /v1/saes``), from the configs."""
        out = []
        for sid, cfg in self.configs.items():
            src = self.specs[sid].source
            out.append(
                SAEInfo(
                    id=sid,
                    hook_point=cfg.hook_point,
                    architecture=cfg.architecture,
                    d_in=cfg.d_in,
                    d_sae=cfg.d_sae,
                    k=cfg.k,
                    model_name=cfg.model_name,
                    source=src if not os.path.isabs(src) else Path(src).name,
                    latent_stats=sid in self.units.typical,
                )
            )
        return out

    # -- internals --------------------------------------------------------------------------------
    def _ensure(self, sid: str) -> SAE:
        sae = self._resident.get(sid)
        if sae is not None:
            self.hits += 1
            self._resident.move_to_end(sid)
            return sae
        self._make_room(self._nbytes[sid], sid)
        import torch

        sae = load_any(self.folders[sid], hook_point=self.specs[sid].hook_point).to(device=self.device, dtype=torch.float32)
        sae.requires_grad_(False)
        self._resident[sid] = sae
        self._resident_bytes[sid] = _tensor_bytes(sae)
        self.loads += 1
        log.info("SAE %r loaded (%s; %d resident, %s)",
                 sid, _mib(self._resident_bytes[sid]), len(self._resident), _mib(self.resident_bytes))
        return sae

    def _make_room(self, need: int, for_sid: str) -> None:
        if self.budget_bytes is None:
            return
        while self.resident_bytes + need > self.budget_bytes:
            victim = next((sid for sid in self._resident if self._pins[sid] <= 0), None)
            if victim is None:
                raise SAEBudgetError(
                    f"SAE {for_sid!r} ({_mib(need)}) does not fit beside the pinned SAEs {self.pinned_ids()} "
                    f"within the SAE memory budget of {_mib(self.budget_bytes)}"
                )
            del self._resident[victim]
            freed = self._resident_bytes.pop(victim)
            self.evictions += 1
            log.info("SAE %r evicted (%s freed)", victim, _mib(freed))

"""Named concepts: saved by ``POST /v1/concepts`` as one JSON file each in ``--concepts-dir``,
listed by ``GET /v1/concepts``, applied by the intervention ``{"op": "concept", "concept": NAME,
"strength": s}`` (``steering.plan.expand_concept``). Files, so they survive a restart and every
process (the HTTP process writes, the workers read) sees the same ones.
"""

from __future__ import annotations

import re
from pathlib import Path

from typing import Annotated

from fastapi import Path as PathParam
from pydantic import ValidationError
from saesteer_client.schema import CONCEPT_NAME, Concept

from .runtime import write_atomic

ConceptName = Annotated[str, PathParam(pattern=CONCEPT_NAME, description="the concept's name")]


class ConceptStore:
    """The concepts in ``folder`` (``<name>.json``, the wire schema's ``Concept``).

    Args:
        folder: the concepts directory, created if missing; None: a store that holds nothing and
            refuses to save (``save`` raises ``RuntimeError``).

    A file that is not a valid ``Concept`` is skipped by ``list`` and read as absent by ``get``.
    Reads are cached by the file's modification time, so a worker sees a replaced concept at once.
    """

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, tuple[float, Concept]] = {}

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str) -> Concept | None:
        """The concept called ``name``, or None (also for a name that is not a ``CONCEPT_NAME``)."""
        if self.folder is None or not re.match(CONCEPT_NAME, name):
            return None
        path = self._path(name)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        hit = self._cache.get(name)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        try:
            concept = Concept.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            return None
        self._cache[name] = (mtime, concept)
        return concept

    def list(self) -> list[Concept]:
        """Every valid concept, by name."""
        if self.folder is None:
            return []
        out = [self.get(p.stem) for p in sorted(self.folder.glob("*.json"))]
        return [c for c in out if c is not None]

    def save(self, concept: Concept) -> bool:
        """Write ``concept`` (atomically); True if it replaced one of the same name.

        Raises:
            RuntimeError: the store has no folder.
        """
        if self.folder is None:
            raise RuntimeError("no concepts directory")
        path = self._path(concept.name)
        existed = path.exists()
        write_atomic(path, concept.model_dump_json(indent=1, exclude_defaults=True))
        return existed

    def delete(self, name: str) -> bool:
        """Remove the concept ``name``; False if there was none."""
        if self.folder is None or not re.match(CONCEPT_NAME, name):
            return False
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return False
        self._cache.pop(name, None)
        return True


def install(app, store: ConceptStore, pool) -> None:
    """Add ``GET/POST /v1/concepts`` and ``GET/DELETE /v1/concepts/{name}`` to ``app`` (they run in
    the HTTP process: files only, no model). A concept is checked like a request's interventions
    against the attached SAEs (``steering.plan.build_plan`` on their configs and statistics): an
    unknown SAE, a latent out of range or a unit the SAE's statistics cannot resolve is a 422
    naming the field. Raw vectors must target an SAE's hook point (the HTTP process has no model
    to list the others)."""
    from saesteer_client.schema import ConceptList
    from starlette.responses import JSONResponse, Response

    from saesteer.steering.plan import PlanError, build_plan

    from .errors import error_response, field_error

    def no_dir():
        return field_error(404, ["path"], "this server keeps no concepts: start it with --concepts-dir", "not_found")

    def list_concepts() -> ConceptList:
        return ConceptList(concepts=store.list())

    def get_concept(name: ConceptName):
        concept = store.get(name)
        if concept is None:
            return field_error(404, ["path", "name"], f"no concept {name[:100]!r}", "not_found")
        return concept

    def save_concept(concept: Concept):
        if store.folder is None:
            return no_dir()
        try:
            build_plan(concept.interventions, pool.configs, None, pool.units)
        except PlanError as e:
            item = e.item.model_copy(update={"loc": ["body", "interventions", *e.item.loc[2:]]})
            return error_response(422, [item])
        replaced = store.save(concept)
        return JSONResponse(concept.model_dump(mode="json"), status_code=200 if replaced else 201)

    def delete_concept(name: ConceptName):
        if store.folder is None:
            return no_dir()
        if not store.delete(name):
            return field_error(404, ["path", "name"], f"no concept {name[:100]!r}", "not_found")
        return Response(status_code=204)

    app.add_api_route("/v1/concepts", list_concepts, methods=["GET"], response_model=ConceptList)
    app.add_api_route("/v1/concepts", save_concept, methods=["POST"], response_model=Concept, status_code=201,
                      summary="Save a named concept (created: 201, replaced: 200)")
    app.add_api_route("/v1/concepts/{name}", get_concept, methods=["GET"], response_model=Concept)
    app.add_api_route("/v1/concepts/{name}", delete_concept, methods=["DELETE"], status_code=204)

"""Did the build import and export its registry cache? Decided from evidence, never from the job (pure).

buildctl exits 0 when the cache export fails under ``ignore-error=true`` (the image is pushed
first); only the ``exporting cache to registry`` vertex's ``error`` tells. So:

* **exported** is true only when an export was asked for, every ``exporting cache to …`` vertex
  completed without an error, and buildctl's ``--metadata-file`` has ``cache.manifest``;
  otherwise false, with ``error``: the vertex's error, or why the evidence is missing when the
  build succeeded without it (a build that ended before the export has no error here).
* **imported** is true when an ``importing cache manifest from …`` vertex completed without an
  error. A cold cache's ``… not found`` is a miss (false, no error); any other import error is
  kept in ``import_error`` (BuildKit goes on without the cache).
* **export_outcome** (``exported`` | ``failed`` | ``skipped``, None when no export was asked
  for) labels the ``buildq_cache_exports_total`` metric: ``skipped`` when the build ended before
  the export started.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .phases import classify
from .progress import VertexState

#: the end of a cold cache import's error: the cache does not exist yet (a miss)
MISS_SUFFIX = "not found"
NO_MANIFEST = "buildctl's metadata file has no cache.manifest"
NO_EXPORT = "the build's progress shows no cache export"


@dataclass(frozen=True, slots=True)
class CacheEvidence:
    """What the stream and the metadata file say about the registry cache of one build."""

    imported: bool
    import_error: str | None
    exported: bool
    error: str | None
    export_outcome: str | None


def is_miss(error: str) -> bool:
    """True for the import error of a cache that does not exist yet (a cold build)."""
    return error.rstrip().endswith(MISS_SUFFIX)


def cache_evidence(
    vertices: Iterable[VertexState],
    metadata: Mapping[str, Any] | None,
    *,
    export_requested: bool,
    succeeded: bool,
) -> CacheEvidence:
    """The cache report of a build from its vertices and its metadata file (None when absent)."""
    imports = []
    exports = []
    for v in vertices:
        phase = classify(v.name)
        if phase == "cache_import":
            imports.append(v)
        elif phase == "cache_export":
            exports.append(v)
    import_errors = [v.error for v in imports if v.error]
    imported = bool(imports) and not import_errors and all(v.completed is not None for v in imports)
    import_error = next((e for e in import_errors if not is_miss(e)), None)
    if not export_requested:
        return CacheEvidence(imported, import_error, False, None, None)
    export_error = next((v.error for v in exports if v.error), None)
    manifest = bool(metadata and metadata.get("cache.manifest"))
    complete = bool(exports) and all(v.completed is not None for v in exports)
    exported = complete and export_error is None and manifest
    error = export_error
    if not exported and error is None and succeeded:
        error = NO_MANIFEST if complete else NO_EXPORT
    if exported:
        outcome = "exported"
    elif exports or succeeded:
        outcome = "failed"
    else:
        outcome = "skipped"
    return CacheEvidence(imported, import_error, exported, error, outcome)

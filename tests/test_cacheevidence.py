"""cache_evidence over the genuine captures and the stand-in's failed-export stream (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from buildq.buildkit.phases import NO_EXPORT, NO_MANIFEST, cache_evidence, is_miss
from buildq.buildkit.progress import ProgressTracker, VertexState
from tests.standin.standin_replay import cache_export_failed_lines

BUILDS = Path(__file__).parent / "fixtures" / "buildkit" / "builds"
REF = "127.0.0.1:5000/demo/app:buildcache"


def tracked(lines: list[str]) -> ProgressTracker:
    tracker = ProgressTracker(clock=lambda: 0.0)
    for line in lines:
        tracker.feed(line)
    return tracker


def capture(name: str) -> tuple[list[str], dict]:
    lines = (BUILDS / f"{name}.stderr").read_text().splitlines()
    return lines, json.loads((BUILDS / f"{name}.meta.json").read_text())


@pytest.mark.parametrize(("variant", "imported"), [("cold", False), ("warm", True), ("regwarm", True)])
def test_genuine_builds_exported_and_imported_as_the_stream_says(variant: str, imported: bool) -> None:
    lines, meta = capture(f"ctx_oci_rawjson_{variant}")
    got = cache_evidence(tracked(lines).vertices.values(), meta, export_requested=True, succeeded=True)
    assert (got.exported, got.error, got.export_outcome) == (True, None, "exported")
    # the cold import's "not found" is a miss, not an error
    assert (got.imported, got.import_error) == (imported, None)


def test_failed_export_under_ignore_error_is_not_exported() -> None:
    lines, meta = capture("ctx_oci_rawjson_cold")
    meta.pop("cache.manifest")  # what buildctl writes when the export failed under ignore-error=true
    edited = cache_export_failed_lines(lines, True, None, REF)
    got = cache_evidence(tracked(edited).vertices.values(), meta, export_requested=True, succeeded=True)
    assert got.exported is False and got.export_outcome == "failed"
    assert got.error is not None and got.error.startswith("error writing layer blob: failed to do request")
    assert got.error.endswith("connect: connection refused")


def test_a_vertex_without_error_but_no_manifest_is_not_exported() -> None:
    lines, meta = capture("ctx_oci_rawjson_warm")
    meta.pop("cache.manifest")
    got = cache_evidence(tracked(lines).vertices.values(), meta, export_requested=True, succeeded=True)
    assert (got.exported, got.error, got.export_outcome) == (False, NO_MANIFEST, "failed")


def test_a_build_that_ended_before_the_export_skipped_it() -> None:
    lines, _ = capture("ctx_oci_rawjson_cold")
    head = [ln for ln in lines if "exporting" not in ln][:12]
    got = cache_evidence(tracked(head).vertices.values(), None, export_requested=True, succeeded=False)
    assert (got.exported, got.error, got.export_outcome) == (False, None, "skipped")
    empty = cache_evidence([], None, export_requested=True, succeeded=False)
    assert (empty.exported, empty.imported, empty.export_outcome) == (False, False, "skipped")
    # exit 0 with no export in the stream at all is not taken on trust
    odd = cache_evidence([], {"cache.manifest": "{}"}, export_requested=True, succeeded=True)
    assert (odd.exported, odd.error) == (False, NO_EXPORT)


def test_no_export_requested_counts_nothing() -> None:
    lines, meta = capture("ctx_oci_rawjson_cold")
    got = cache_evidence(tracked(lines).vertices.values(), meta, export_requested=False, succeeded=True)
    assert (got.exported, got.error, got.export_outcome) == (False, None, None)


def test_an_import_error_other_than_a_miss_is_kept() -> None:
    refused = 'failed to do request: Head "https://reg/v2/app/manifests/buildcache": connection refused'
    name = f"importing cache manifest from {REF}"
    vertex = VertexState(digest="d", name=name, completed=1.0, error=refused)
    got = cache_evidence([vertex], None, export_requested=False, succeeded=True)
    assert (got.imported, got.import_error) == (False, refused)
    assert is_miss(f"failed to configure registry cache importer: {REF}: not found")
    assert not is_miss(refused)

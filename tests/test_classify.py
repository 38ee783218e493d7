"""buildq.buildkit.classify: genuine buildctl v0.21.0 captures, a table of real-world wordings,
precedence, killed runs, the message, operator patterns, and junk that must never raise."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from buildq.buildkit import classify
from buildq.buildkit.classify import (
    PERMANENT_REASONS,
    TRANSIENT_REASONS,
    Failure,
    classify_failure,
)
from buildq.buildkit.progress import ProgressTracker

FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"
TAIL_LINES = 20  # what the runner keeps of stderr


def classify_stream(exit_code: int, lines: list[str], **options: Any) -> Failure | None:
    """Classify as the runner does: the stream goes through a ProgressTracker, which hands over
    the vertex errors; the text lines are passed as they are (progress objects are skipped)."""
    tracker = ProgressTracker()
    for line in lines:
        tracker.feed(line)
    return classify_failure(exit_code, lines, vertex_errors=tracker.vertex_errors(), **options)


def _capture(path: Path) -> tuple[int, list[str]]:
    name = path.name.removesuffix(".rc")
    rc = int(path.read_text().strip())
    return rc, path.with_name(name + ".stderr").read_text().splitlines()


# --- genuine captures --------------------------------------------------------------------------

ERROR_CAPTURES: dict[str, tuple[bool, str] | None] = {
    "err_i_refused_tcp_plain": (True, "daemon_unreachable"),
    "err_i_refused_tcp_rawjson": (True, "daemon_unreachable"),
    "err_iii_sigterm_plain": None,  # the daemon drained and the build finished: rc 0
    "err_iii_sigterm_sigkill_plain": (True, "goaway"),
    "err_iv_syntax_plain": (False, "dockerfile_syntax"),
    "err_iv_syntax_rawjson": (False, "dockerfile_syntax"),
    "err_vi_registry_down_rawjson": (True, "registry_unavailable"),
    "err_vii_disk_full_plain": (True, "daemon_storage"),
    "err_vii_disk_full_rawjson": (True, "daemon_storage"),
}


def test_every_error_capture_is_in_the_table() -> None:
    names = {p.name.removesuffix(".rc") for p in (FIXTURES / "errors").glob("*.rc")}
    assert names == set(ERROR_CAPTURES)


@pytest.mark.parametrize("name", sorted(ERROR_CAPTURES))
@pytest.mark.parametrize("keep", [None, TAIL_LINES])
def test_error_captures(name: str, keep: int | None) -> None:
    rc, lines = _capture(FIXTURES / "errors" / f"{name}.rc")
    tail = lines if keep is None else lines[-keep:]
    failure = classify_stream(rc, tail)
    expected = ERROR_CAPTURES[name]
    if expected is None:
        assert failure is None
        return
    assert failure is not None
    assert (failure.transient, failure.reason) == expected
    error_line = next(line for line in reversed(lines) if line.startswith("error: "))
    assert failure.message == error_line.removeprefix("error: ")


OCIFALSE = sorted((FIXTURES / "builds").glob("ctx_ocifalse_*.rc"))


def test_ocifalse_captures_exist() -> None:
    assert len(OCIFALSE) == 6


@pytest.mark.parametrize("path", OCIFALSE, ids=lambda p: p.name)
@pytest.mark.parametrize("keep", [None, TAIL_LINES])
def test_ocifalse_captures_fail_permanently(path: Path, keep: int | None) -> None:
    rc, lines = _capture(path)
    assert rc == 1
    failure = classify_stream(rc, lines if keep is None else lines[-keep:])
    assert failure == Failure(
        False, "invalid_cache_config", "failed to solve: invalid configuration for remote cache"
    )


SUCCESSES = sorted(p for p in FIXTURES.glob("*/*.rc") if p.read_text().strip() == "0")


def _shows_an_error(path: Path) -> bool:
    text = path.with_name(path.name.removesuffix(".rc") + ".stderr").read_text()
    return "ERROR: " in text or '"error":' in text


def test_successful_captures_include_errors_in_progress() -> None:
    assert len(SUCCESSES) >= 20
    assert len([p for p in SUCCESSES if _shows_an_error(p)]) >= 9  # every cold build reports the cache miss


@pytest.mark.parametrize("path", [p for p in SUCCESSES if _shows_an_error(p)], ids=lambda p: p.name)
def test_cache_miss_in_progress_is_not_read_as_a_cause(path: Path) -> None:
    """Had such a run failed without an error line, the cache-import miss would not decide the class."""
    _, lines = _capture(path)
    failure = classify_stream(1, lines)
    assert failure is not None and failure.reason == "unknown"


@pytest.mark.parametrize("path", SUCCESSES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_exit_zero_is_never_a_failure(path: Path) -> None:
    rc, lines = _capture(path)
    assert classify_stream(rc, lines) is None
    assert classify_stream(rc, [*lines, "error: failed to solve: context canceled"]) is None


from tests.classify_wordings import WORDINGS  # noqa: E402


def test_wordings_table_is_big_and_covers_every_rule() -> None:
    assert len(WORDINGS) >= 40
    reasons = {reason for _, _, reason in WORDINGS}
    assert {r.reason for r in classify._RULES} <= reasons


@pytest.mark.parametrize(
    ("text", "transient", "reason"), WORDINGS, ids=[f"{w[2]}-{i}" for i, w in enumerate(WORDINGS)]
)
def test_wordings(text: str, transient: bool, reason: str) -> None:
    failure = classify_stream(1, ["#1 [internal] load build definition from Dockerfile", f"error: {text}"])
    assert failure == Failure(transient, reason, text)
    assert reason in (TRANSIENT_REASONS if transient else PERMANENT_REASONS)


@pytest.mark.parametrize(("text", "transient", "reason"), WORDINGS[::7])
def test_wordings_in_the_tail_without_an_error_line(text: str, transient: bool, reason: str) -> None:
    """The same texts are recognised as a vertex error (rawjson) or a ``#N ERROR:`` line (plain)."""
    raw = json.dumps({"vertexes": [{"digest": "sha256:1", "name": "exporting to image", "error": text}]})
    assert classify_stream(1, [raw, '{"statuses":[]}']) == Failure(
        transient, reason, "buildctl exited with code 1"
    )
    plain = classify_stream(1, ["#7 exporting to image", f"#7 ERROR: {text}", "------"])
    assert plain is not None and (plain.transient, plain.reason) == (transient, reason)


# --- precedence and what is read ----------------------------------------------------------------


def test_error_line_wins_over_the_tail() -> None:
    tail = [
        "#9 ERROR: rpc error: code = Unavailable desc = transport is closing",
        'error: failed to solve: process "/bin/sh -c exit 3" did not complete successfully: exit code: 3',
    ]
    assert classify_stream(1, tail) == Failure(
        False,
        "step_failed",
        'failed to solve: process "/bin/sh -c exit 3" did not complete successfully: exit code: 3',
    )


def test_unknown_error_line_falls_back_to_the_tail_but_keeps_its_message() -> None:
    vertex = (
        '{"vertexes":[{"digest":"sha256:2","name":"exporting to image",'
        '"error":"unexpected status: 503 Service Unavailable"}]}'
    )
    failure = classify_stream(1, [vertex, "error: failed to solve: exporter went away"])
    assert failure == Failure(True, "registry_unavailable", "failed to solve: exporter went away")


def test_in_the_tail_a_permanent_cause_beats_a_transient_one() -> None:
    tail = [
        '#5 ERROR: failed to push x: failed to do request: Head "https://r/v2/x": connection refused',
        "#6 ERROR: failed to push y: unexpected status: 401 Unauthorized",
    ]
    failure = classify_stream(1, tail)
    assert failure is not None and failure.reason == "registry_auth" and not failure.transient


@pytest.mark.parametrize(
    "noise",
    [
        # plain step output
        "#8 0.107 curl: (7) Failed to connect to example.com port 443: Connection refused",
        # error-block step output
        "0.345 E: Temporary failure resolving 'deb.debian.org': no such host",
        "   4 | >>> RUN curl https://x || echo 503 Service Unavailable",  # Dockerfile excerpt
        " > [2/2] RUN echo transport is closing:",  # error-block header quoting the command
        "#5 [2/2] RUN echo received prior goaway",  # vertex name quoting the command
        "#3 ERROR: failed to configure registry cache importer: failed to do request: Head "
        '"https://127.0.0.1:5000/v2/demo/app/manifests/buildcache": dial tcp 127.0.0.1:5000: connect: '
        "connection refused",  # the harmless cache-import miss
        '{"vertexes":[{"digest":"sha256:3","name":"RUN echo connection refused","cached":false}]}',
        '{"logs":[{"vertex":"sha256:3","stream":1,"data":"Y29ubmVjdGlvbiByZWZ1c2Vk"}]}',
    ],
)
def test_build_output_and_harmless_errors_are_not_read(noise: str) -> None:
    failure = classify_stream(1, [noise, "error: failed to solve: exporter went away"])
    assert failure == Failure(False, "unknown", "failed to solve: exporter went away")


def test_rawjson_harmless_importer_error_is_not_read() -> None:
    _, lines = _capture(FIXTURES / "errors" / "err_vi_registry_down_rawjson.rc")
    without_final = [
        line for line in lines if not line.startswith("error: ") and "failed to push" not in line
    ]
    failure = classify_stream(1, without_final)
    assert failure is not None and failure.reason == "unknown"


# --- killed runs and the message ----------------------------------------------------------------


@pytest.mark.parametrize("rc", [-9, -15, 137, 143, 130])
def test_killed_without_error_line_is_transient(rc: int) -> None:
    tail = ["#8 [stage-1 1/1] RUN sleep 30", "#8 0.107 sleeping"]
    assert classify_stream(rc, tail) == Failure(True, "killed", "#8 0.107 sleeping")


@pytest.mark.parametrize("rc", [-9, 137, 1])
def test_killed_by_us_is_permanent(rc: int) -> None:
    tail = ["#8 0.107 sleeping", "error: failed to solve: context canceled"]
    assert classify_stream(rc, tail, killed_by_us=True) == Failure(
        False, "killed", "failed to solve: context canceled"
    )
    assert classify_stream(0, tail, killed_by_us=True) is None


def test_signal_exit_with_an_error_line_is_classified_by_text() -> None:
    tail = ['error: failed to solve: process "/bin/sh -c x" did not complete successfully: exit code: 2']
    failure = classify_stream(137, tail)
    assert failure is not None and failure.reason == "step_failed"


@pytest.mark.parametrize("rc", [1, 2, 128, 255])
def test_plain_exit_codes_are_not_signals(rc: int) -> None:
    failure = classify_stream(rc, ["#8 0.107 sleeping"])
    assert failure == Failure(False, "unknown", "#8 0.107 sleeping")


def test_message_is_the_last_error_line_without_prefix() -> None:
    tail = [
        "error: first\r\n",
        "github.com/moby/buildkit/client.(*Client).solve.func4",
        "error: second  ",
        "\tstack",
    ]
    failure = classify_stream(1, tail)
    assert failure is not None and failure.message == "second"


def test_message_falls_back_to_last_non_json_line_then_to_exit_code() -> None:
    tail = ["panic: runtime error", '{"vertexes":[]}', "   ", ""]
    assert classify_stream(2, tail) == Failure(False, "unknown", "panic: runtime error")
    assert classify_stream(1, ['{"statuses":[]}', ""]) == Failure(
        False, "unknown", "buildctl exited with code 1"
    )
    assert classify_stream(-9, []) == Failure(True, "killed", "buildctl exited with code -9")


# --- operator patterns --------------------------------------------------------------------------


def test_extra_patterns_make_unknown_text_transient() -> None:
    tail = ["error: failed to solve: frobnicator overheated"]
    assert classify_stream(1, tail) == Failure(False, "unknown", "failed to solve: frobnicator overheated")
    extra = [r"frobnicator (?:overheated|jammed)"]
    assert classify_stream(1, tail, extra_transient=extra) == Failure(
        True, "custom_transient", "failed to solve: frobnicator overheated"
    )


def test_extra_patterns_come_from_settings() -> None:
    from buildq.config import load_settings

    settings = load_settings({"BUILDQ_TRANSIENT_PATTERNS": r"overheated, exit code: 137$"})
    tail = ['error: failed to solve: process "/bin/sh -c make" did not complete successfully: exit code: 137']
    failure = classify_stream(1, tail, extra_transient=settings.transient_patterns)
    assert failure is not None and (failure.transient, failure.reason) == (True, "custom_transient")
    other = ['error: failed to solve: process "/bin/sh -c make" did not complete successfully: exit code: 1']
    failure = classify_stream(1, other, extra_transient=settings.transient_patterns)
    assert failure is not None and failure.reason == "step_failed"


def test_extra_patterns_are_compiled_once() -> None:
    patterns = ["once-only-pattern-[0-9]+"]
    classify_stream(1, ["error: x"], extra_transient=patterns)
    before = classify._compile_extra.cache_info()
    for _ in range(5):
        classify_stream(1, ["error: y"], extra_transient=list(patterns))
    after = classify._compile_extra.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 5


def test_invalid_extra_pattern_raises() -> None:
    with pytest.raises(re.error):
        classify_stream(1, ["error: x"], extra_transient=["(unclosed"])


# --- exceptions and reason sets -----------------------------------------------------------------


def test_failure_is_frozen() -> None:
    failure = Failure(True, "goaway", "m")
    with pytest.raises(AttributeError):
        failure.reason = "x"  # type: ignore[misc]


def test_reason_labels_are_short_snake_case() -> None:
    for reason in TRANSIENT_REASONS | PERMANENT_REASONS:
        assert re.fullmatch(r"[a-z]+(?:_[a-z]+)*", reason) and len(reason) <= 24


# --- junk never raises ---------------------------------------------------------------------------

_FRAGMENTS = [
    "error: ",
    "#3 ERROR: ",
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    ":",
    " ",
    "\t",
    "\r",
    "\x00",
    "\ufffd",
    "\U0001f600",
    '{"vertexes":',
    '{"vertexes":[{"error":5}]}',
    '{"vertexes":{"error":"x"}}',
    '{"vertexes":[null,"x",{"error":null}]}',
    '{"vertexes":[{"error":"failed to push x: connection refused"}]}',
    '"error"',
    "null",
    "1e999",
    "NaN",
    "code = Unavailable",
    "Unavailable: ",
    "exit code: ",
    "did not complete successfully",
    "401",
    "503",
    "501",
    "not found",
    '"/x": not found',
    "failed to push",
    "http://",
    "/v2/",
    "dial unix ",
    "goaway",
    "RST_STREAM",
    "(?:",
    ")*",
    "a" * 300,
    "#12 0.5 ",
    "   3 | ",
    " > ",
]


def _junk_line(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(1, 12)))
    if kind == 1:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(0, 40)))
    if kind == 2:
        depth = rng.randrange(1, 5000)
        opener = rng.choice(["{", "[", '{"vertexes":[', '{"error":', '{"vertexes":[{"error":'])
        return opener * depth + rng.choice(["", "}" * depth, "]" * depth])
    return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(0, 200)))


def test_huge_lines_are_classified_and_kept_whole_in_the_message() -> None:
    script = "echo " + "x" * 100_000
    text = f'failed to solve: process "/bin/sh -c {script}" did not complete successfully: exit code: 2'
    assert classify_stream(1, [f"error: {text}"]) == Failure(False, "step_failed", text)
    vertex = '{"vertexes":[{"digest":"d","name":"n","error":"' + "y" * 100_000 + ': connection refused"}]}'
    failure = classify_stream(1, [vertex])
    assert failure is not None and failure.reason == "network_error"


def test_rule_patterns_use_no_upper_case_escapes() -> None:
    """Patterns are lower-cased before compiling, which would turn \\S into \\s."""
    raw_strings = re.findall(r'\br"((?:[^"\\]|\\.)*)"', Path(classify.__file__).read_text())
    assert len(raw_strings) > 80
    assert [r for r in raw_strings if re.search(r"\\[SDWBAZ]", r)] == []


def test_random_junk_never_raises() -> None:
    rng = random.Random(20261128)
    all_reasons = TRANSIENT_REASONS | PERMANENT_REASONS
    for _ in range(1500):
        tail = [_junk_line(rng) for _ in range(rng.randrange(0, 12))]
        rc = rng.choice([0, 1, 2, -9, 137, 255, 4096, -1])
        extra = rng.choice([(), ("x",), ("[0-9]{3}", "goaway")])
        failure = classify_stream(rc, tail, extra_transient=extra, killed_by_us=rng.random() < 0.1)
        if rc == 0:
            assert failure is None
            continue
        assert isinstance(failure, Failure)
        assert failure.reason in all_reasons and isinstance(failure.message, str) and failure.message
        assert classify_stream(rc, tail, extra_transient=extra, killed_by_us=False) == classify_stream(
            rc, list(tail), extra_transient=list(extra)
        )

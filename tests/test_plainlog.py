"""PlainLogRenderer: genuine rawjson captures replay to the genuine --progress=plain text, live."""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from buildq.buildkit.phases import union
from buildq.buildkit.plainlog import PlainLogRenderer, format_bytes
from buildq.buildkit.progress import MAX_PARTIAL_BYTES, TAIL_LINES, OutputTails, parse_line
from buildq.engine.redact import Redactor

FIX = Path(__file__).parent / "fixtures" / "buildkit"


def feed_line(renderer: PlainLogRenderer, line: str) -> list[str]:
    """Feed one stderr line as the worker does: parsed first; a text line gives nothing."""
    status = parse_line(line)
    return [] if status is None else renderer.feed(status)


CTX_PAIRS = [
    (f"builds/ctx_{cache}_rawjson_{phase}.stderr", f"builds/ctx_{cache}_plain_{phase}.stderr")
    for cache in ("oci", "default", "ociindex", "dockerlist", "ocifalse")
    for phase in ("cold", "warm", "regwarm")
]
TRACE_COLD = ("extra/extra_cachemetrics_trace_cold.trace.json", "extra/extra_cachemetrics_trace_cold.stderr")
PAIRS = [
    *CTX_PAIRS,
    TRACE_COLD,
    ("errors/err_iv_syntax_rawjson.stderr", "errors/err_iv_syntax_plain.stderr"),
    ("errors/err_i_refused_tcp_rawjson.stderr", "errors/err_i_refused_tcp_plain.stderr"),
]

LOG = re.compile(r"^#\d+ \d+\.\d+ ")
MARK = re.compile(r"^#\d+ (DONE( \d+\.\d+s)?|CACHED|CANCELED|ERROR: .*)$")
HEADER_OR_ANY = re.compile(r"^#(\d+) ")


def norm(line: str) -> str:
    """Drop what differs between two runs of one build: durations, log offsets, digests."""
    line = re.sub(r"^(#\d+) \d+\.\d+ ", r"\1 ", line)
    line = re.sub(r" \d+\.\d+s\b", "", line)
    return re.sub(r"\b[0-9a-f]{64}\b", "<hex>", line)


@dataclass
class Shape:
    """A plain log split into what must match exactly and what may legitimately differ."""

    skeleton: list[str] = field(default_factory=list)  # headers, output lines, end markers, in order
    done: Counter[str] = field(default_factory=Counter)  # "... done" status lines, per #N
    open: Counter[str] = field(default_factory=Counter)  # open status lines, per #N
    summary: list[str] = field(default_factory=list)  # the ------ error blocks
    other: list[str] = field(default_factory=list)  # not progress: "error: ...", Dockerfile excerpt


def shape(lines: list[str], normalise: bool = True) -> Shape:
    n = norm if normalise else (lambda s: s)
    s = Shape()
    header_next = True
    rest = iter(lines)
    for line in rest:
        if line == "------":  # error summary: "------", " > name:", output lines..., "------"
            s.summary += [line, *(n(ln) for ln in iter(rest.__next__, "------")), "------"]
            continue
        if s.summary or not HEADER_OR_ANY.match(line):
            header_next = header_next or line == ""
            if line:
                s.other.append(line)
            continue
        if header_next or line.endswith(" ...") or LOG.match(line) or MARK.match(line):
            s.skeleton.append(n(line))
        elif line.endswith(" done"):
            s.done[n(line)] += 1
        else:
            s.open[n(line)] += 1
        header_next = False
    return s


def render(path: Path) -> list[str]:
    r = PlainLogRenderer()
    out: list[str] = []
    for line in path.read_text().splitlines():
        out += feed_line(r, line)
    return out + r.finish()


def plain_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if not ln.startswith("time=")]


def non_json_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if parse_line(ln) is None]


@pytest.mark.parametrize(("rawjson", "plain"), PAIRS, ids=[p[0].split("/")[1].split(".")[0] for p in PAIRS])
def test_replay_matches_genuine_plain_capture(rawjson: str, plain: str) -> None:
    ours, theirs = shape(render(FIX / rawjson)), shape(plain_lines(FIX / plain))
    assert ours.skeleton == theirs.skeleton  # names with #N, output lines, DONE/CACHED/ERROR
    assert ours.done == theirs.done  # every completed status, same text (order may differ)
    assert not theirs.open - ours.open  # every open status buildctl showed, we show too
    assert ours.summary == theirs.summary
    assert ours.other == []
    assert theirs.other == non_json_lines(FIX / rawjson)  # the rest is buildctl's own error text


def test_same_run_pair_matches_to_the_millisecond() -> None:
    """The trace and the plain text come from one build: output offsets and durations agree too."""
    ours = shape(render(FIX / TRACE_COLD[0]), normalise=False)
    theirs = shape(plain_lines(FIX / TRACE_COLD[1]), normalise=False)
    assert ours.skeleton == theirs.skeleton
    assert ours.done == theirs.done
    assert "#11 0.080 total 1036" in ours.skeleton
    assert "#8 DONE 2.1s" in ours.skeleton
    assert "#4 transferring context: 1.98MB 0.9s done" in ours.done


def test_extra_lines_are_only_open_statuses_buildctl_coalesced() -> None:
    ours = render(FIX / TRACE_COLD[0])
    theirs = plain_lines(FIX / TRACE_COLD[1])
    extra = Counter(ours) - Counter(theirs)
    assert extra, "the renderer shows open statuses buildctl's 100 ms repaint skipped"
    for line in extra:
        number, rest = line.split(" ", 1)
        assert any(t.startswith(f"{number} {rest} ") and t.endswith(" done") for t in ours), line


def test_warm_trace_same_blocks_though_buildctl_numbers_ties_randomly() -> None:
    """Seven vertices cached at one instant: buildctl orders equal stop times by map order."""
    ours = shape(render(FIX / "extra/extra_cachemetrics_trace_warm.trace.json"))
    theirs = shape(plain_lines(FIX / "extra/extra_cachemetrics_trace_warm.stderr"))

    def unnumbered(s: Shape) -> Counter[str]:
        return Counter(re.sub(r"^#\d+ ", "", line) for line in s.skeleton)

    assert unnumbered(ours) == unnumbered(theirs)
    assert ours.done == theirs.done
    assert ours.skeleton[:8] == theirs.skeleton[:8]  # up to #4; #5..#11 are the tie


# -- live behaviour ---------------------------------------------------------------------------


def test_lines_are_emitted_before_the_stream_ends() -> None:
    lines = (FIX / TRACE_COLD[0]).read_text().splitlines()
    r = PlainLogRenderer()
    first_half = [out for line in lines[: len(lines) // 2] for out in feed_line(r, line)]
    assert "#1 DONE 0.0s" in first_half and "#4 DONE 0.9s" in first_half
    assert '#7 [base 3/3] RUN ["/bin/busybox", "--install", "-s", "/bin"]' in first_half
    assert first_half[-1] == "#7 DONE 0.1s"
    per_feed = [feed_line(r, line) for line in lines[len(lines) // 2 :]]
    output_feed = next(out for out in per_feed if "#11 0.080 total 1036" in out)
    assert not any("#11 DONE" in line for line in output_feed)  # output before the step ends
    done_feed = next(out for out in per_feed if "#11 DONE 0.1s" in out)
    assert done_feed == ["#11 DONE 0.1s"]


def test_each_step_completion_is_returned_by_the_feed_that_carries_it() -> None:
    r = PlainLogRenderer()
    for line in (FIX / TRACE_COLD[0]).read_text().splitlines():
        status = parse_line(line)
        assert status is not None
        out = r.feed(status)
        for v in status.vertexes:
            if v.completed and v.inputs:  # steps (a source may hold a sub-ms probe, tested below)
                assert any(MARK.match(o) for o in out), (v.name, out)


# -- synthetic streams ------------------------------------------------------------------------

T0 = 1_800_000_000.0


def ts(seconds: float) -> str:
    return datetime.fromtimestamp(T0 + seconds, UTC).isoformat().replace("+00:00", "Z")


def vtx(digest: str, name: str, start: float | None = None, stop: float | None = None, /, **kw: Any) -> str:
    v: dict[str, Any] = {"digest": digest, "name": name, **kw}
    if start is not None:
        v["started"] = ts(start)
    if stop is not None:
        v["completed"] = ts(stop)
    return json.dumps({"vertexes": [v]})


def log(digest: str, at: float, data: bytes, stream: int = 1) -> str:
    entry = {"vertex": digest, "stream": stream, "data": base64.b64encode(data).decode(), "timestamp": ts(at)}
    return json.dumps({"logs": [entry]})


def feed(r: PlainLogRenderer, *lines: str) -> list[str]:
    return [out for line in lines for out in feed_line(r, line)]


STEP: dict[str, Any] = {"inputs": ["sha256:base"]}


def test_partial_lines_are_joined_and_stamped_with_their_first_fragment() -> None:
    r = PlainLogRenderer()
    assert feed(r, vtx("a", "[1/1] RUN x", 0.0, **STEP)) == ["#1 [1/1] RUN x"]
    assert feed(r, log("a", 0.25, b"hel")) == []
    assert feed(r, log("a", 0.5, b"lo\nwor")) == ["#1 0.250 hello"]
    assert feed(r, log("a", 12.5, b"ld\n\n")) == ["#1 0.500 world", "#1 12.50 "]
    assert feed(r, log("a", 13.0, b"tail without newline")) == []
    assert feed(r, vtx("a", "[1/1] RUN x", 0.0, 14.0, **STEP)) == [
        "#1 13.00 tail without newline",
        "#1 DONE 14.0s",
    ]


def test_utf8_split_across_entries_and_invalid_bytes() -> None:
    r = PlainLogRenderer()
    feed(r, vtx("a", "s", 0.0, **STEP))
    assert feed(r, log("a", 0.1, b"caf\xc3"), log("a", 0.2, b"\xa9 \xff!\n")) == ["#1 0.100 café \ufffd!"]


def test_long_partial_line_is_flushed_in_bounded_chunks() -> None:
    r = PlainLogRenderer()
    feed(r, vtx("a", "s", 0.0, **STEP))
    out = feed(r, log("a", 0.1, b"x" * (2 * MAX_PARTIAL_BYTES + 100)))
    assert [len(line) for line in out] == [len("#1 0.100 ") + MAX_PARTIAL_BYTES] * 2
    assert feed(r, log("a", 0.2, b"\n")) == ["#1 0.100 " + "x" * 100]
    out = feed(r, log("a", 0.3, "é".encode() * MAX_PARTIAL_BYTES + b"\n"))
    assert all("\ufffd" not in line for line in out)  # chunks never split a UTF-8 sequence


def test_memory_is_bounded_per_vertex() -> None:
    r = PlainLogRenderer()
    feed(r, vtx("a", "a", 0.0, **STEP), vtx("b", "b", 0.0, **STEP))
    for i in range(2000):
        feed_line(r, log("a" if i % 2 else "b", 0.001 * i, b"line %d\n" % i))
        feed_line(
            r,
            json.dumps(
                {"statuses": [{"id": f"layer {i}", "vertex": "a", "started": ts(i), "timestamp": ts(i)}]}
            ),
        )
    assert sum(len(v.tail) + len(v.lines) for v in r._vtx.values()) == 2 * TAIL_LINES
    assert len(r._last_status) <= 1024
    assert len(r._vtx["a"].statuses) == 256  # open statuses are capped, done ones are dropped
    feed_line(
        r,
        json.dumps({"statuses": [{"id": "layer 1999", "vertex": "a", "started": ts(7), "completed": ts(8)}]}),
    )
    assert "layer 1999" not in r._vtx["a"].statuses


def test_vertices_are_numbered_when_they_start_not_when_declared() -> None:
    r = PlainLogRenderer()
    assert feed(r, vtx("b", "[2/2] later", **STEP), vtx("a", "[1/2] first", **STEP)) == []
    assert feed(r, vtx("a", "[1/2] first", 0.0, 1.0, **STEP)) == ["#1 [1/2] first", "#1 DONE 1.0s"]
    assert feed(r, vtx("b", "[2/2] later", 1.0, 1.0, cached=True, **STEP)) == [
        "",
        "#2 [2/2] later",
        "#2 CACHED",
    ]


def test_source_probe_interval_merges_into_the_real_run() -> None:
    """A source's ~30 us cache-request interval does not print a DONE block of its own."""
    r = PlainLogRenderer()
    assert feed(r, vtx("s", "[internal] load build context", 0.0, 0.00003)) == []
    assert feed(r, vtx("s", "[internal] load build context", 0.001)) == ["#1 [internal] load build context"]
    assert feed(r, vtx("s", "[internal] load build context", 0.001, 0.07)) == ["#1 DONE 0.1s"]


def test_probe_without_restart_prints_after_the_repaint_window_or_at_finish() -> None:
    r = PlainLogRenderer()
    assert feed(r, vtx("s", "src", 0.0, 0.0001)) == []
    assert feed(r, vtx("x", "step", 0.05, **STEP)) == ["#1 step"]
    assert feed(r, vtx("x", "step", 0.05, 0.25, **STEP)) == ["#1 DONE 0.2s", "", "#2 src", "#2 DONE 0.0s"]
    r = PlainLogRenderer()
    feed(r, vtx("s", "src", 0.0, 0.0001))
    assert r.finish() == ["#1 src", "#1 DONE 0.0s"]


def test_concurrent_steps_interleave_with_continuation_markers() -> None:
    r = PlainLogRenderer()
    out = feed(r, vtx("a", "A", 0.0, **STEP), vtx("b", "B", 0.0, **STEP), log("b", 0.5, b"from b\n"))
    assert out == ["#1 A", "#1 ...", "", "#2 B", "#2 0.500 from b"]
    assert feed(r, log("a", 0.6, b"from a\n")) == ["#2 ...", "", "#1 A", "#1 0.600 from a"]
    assert feed(r, vtx("b", "B", 0.0, 1.0, **STEP)) == ["#1 ...", "", "#2 B", "#2 DONE 1.0s", "", "#1 A"]


def test_status_lines_sizes_times_and_warnings() -> None:
    r = PlainLogRenderer()
    feed(r, vtx("p", "exporting to image", 0.0))
    st = {"id": "pushing layers", "vertex": "p", "started": ts(0.0)}
    assert feed(
        r, json.dumps({"statuses": [{**st, "current": 500, "total": 2_000_000, "timestamp": ts(1)}]})
    ) == ["#1 pushing layers 500B / 2.00MB 1.0s"]
    # below 5 % progress and within 5 s of the last print: BuildKit skips the repaint
    assert (
        feed(r, json.dumps({"statuses": [{**st, "current": 50_000, "total": 2_000_000, "timestamp": ts(2)}]}))
        == []
    )
    done = {**st, "current": 2_000_000, "total": 2_000_000, "timestamp": ts(3), "completed": ts(3)}
    assert feed(r, json.dumps({"statuses": [done]})) == ["#1 pushing layers 2.00MB / 2.00MB 3.0s done"]
    warning = {"vertex": "p", "level": 1, "short": base64.b64encode(b"careful").decode()}
    assert feed(r, json.dumps({"warnings": [warning]})) == ["#1 WARN: careful"]


def test_format_bytes_and_interval_union() -> None:
    assert [format_bytes(n) for n in (2, 121, 999, 1000, 1230, 8_591_061, 1_982_653)] == [
        "2B", "121B", "999B", "1.00kB", "1.23kB", "8.59MB", "1.98MB",
    ]  # fmt: skip
    assert union([(3.0, 4.0), (0.0, 1.0), (0.5, 2.0)]) == [(0.0, 2.0), (3.0, 4.0)]
    assert union([(0.0, 1.0), (0.5, None), (5.0, 6.0)]) == [(0.0, None)]
    assert union([(1.0, 1.0), (2.0, 3.0)], drop_empty=True) == [(2.0, 3.0)]
    assert union([(1.0, 1.0), (2.0, 3.0)]) == [(1.0, 1.0), (2.0, 3.0)]


def failing_build(r: PlainLogRenderer, lines: int = 60) -> list[str]:
    out = feed(r, vtx("a", "[1/2] RUN make", 0.0, **STEP))
    for i in range(lines):
        out += feed(r, log("a", 0.1, b"out %d\n" % i))
    out += feed(r, vtx("c", "[2/2] RUN other", 0.0, 0.5, error="context canceled", **STEP))
    out += feed(
        r, vtx("a", "[1/2] RUN make", 0.0, 1.0, error="process did not complete successfully", **STEP)
    )
    return out


def test_error_and_cancel_markers_and_summary_block() -> None:
    r = PlainLogRenderer()
    out = failing_build(r, lines=12)
    assert "#1 ERROR: process did not complete successfully" in out
    assert "#2 CANCELED" in out
    summary = r.finish()
    assert summary == ["------", " > [1/2] RUN make:", *[f"0.100 out {i}" for i in range(2, 12)], "------"]


def test_tail_of_failing_step() -> None:
    r = PlainLogRenderer()
    failing_build(r)
    feed(r, vtx("z", "later", 2.0, **STEP), log("z", 2.1, b"unrelated\n"))
    assert r.failing_tail(3) == ["out 57", "out 58", "out 59"]
    assert len(r.failing_tail(500)) == TAIL_LINES
    r = PlainLogRenderer()
    feed(
        r,
        vtx("a", "A", 0.0, **STEP),
        log("a", 0.1, b"one\n"),
        vtx("b", "B", 0.2, **STEP),
        log("b", 0.3, b"two\npar"),
    )
    assert r.failing_tail() == ["two", "par"]  # nothing failed: last step with output
    assert PlainLogRenderer().failing_tail() == []


def test_secret_in_step_output_is_redacted_after_decoding() -> None:
    secret = "hunter2-sup3r-s3cret"
    r = PlainLogRenderer(redact=Redactor([secret]).redact)
    out = feed(r, vtx("a", f"[1/1] RUN echo {secret}", 0.0, **STEP))
    out += feed(
        r, log("a", 0.1, f"token={secret[:7]}".encode()), log("a", 0.2, f"{secret[7:]} ok\n".encode())
    )
    b64 = base64.b64encode(secret.encode()).decode()
    out += feed(r, log("a", 0.3, f"basic {b64}\n".encode()))
    assert out == ["#1 [1/1] RUN echo ***", "#1 0.100 token=*** ok", "#1 0.300 basic ***"]
    assert r.failing_tail() == ["token=*** ok", "basic ***"]


def test_statuses_of_one_update_print_in_start_order_like_buildkit() -> None:
    r = PlainLogRenderer()
    feed(r, vtx("c", "exporting cache to registry", 0.0))
    prep = {"id": "preparing", "vertex": "c", "started": ts(0.0), "timestamp": ts(0.0)}
    late = {"id": "writing manifest", "vertex": "c", "started": ts(0.1), "timestamp": ts(0.1)}
    assert feed(r, json.dumps({"statuses": [prep]}), json.dumps({"statuses": [late]})) == [
        "#1 preparing",
        "#1 writing manifest",
    ]
    both = [{**late, "completed": ts(0.1)}, {**prep, "completed": ts(0.2), "timestamp": ts(0.2)}]
    assert feed(r, json.dumps({"statuses": both})) == ["#1 preparing 0.2s done", "#1 writing manifest done"]


def tails_and_renderer(redact: Any = None, safe_cut: Any = None) -> tuple[OutputTails, PlainLogRenderer]:
    return OutputTails(redact, safe_cut), PlainLogRenderer(redact=redact, safe_cut=safe_cut)


@pytest.mark.parametrize(
    "capture", sorted(p.name for p in (FIX / "builds").glob("*rawjson*.stderr"))
    + sorted(f"../errors/{p.name}" for p in (FIX / "errors").glob("*rawjson*.stderr")),
)  # fmt: skip
def test_the_worker_s_output_tails_are_the_plain_renderer_s(capture: str) -> None:
    """The worker keeps only each step's output tail (OutputTails: nothing rendered, the plain
    view is rendered when read); its failing tail is the renderer's, line for line, on every
    genuine capture, with a secret masked."""
    redact = Redactor(["sha256", "hello"]).redact
    tails, renderer = tails_and_renderer(redact)
    for line in (FIX / "builds" / capture).read_text().splitlines():
        status = parse_line(line)
        if status is not None:
            tails.feed(status)
            renderer.feed(status)
    assert tails.failing_tail(30) == renderer.end(30)[1]


def test_output_tails_match_the_renderer_on_failures_partial_and_cut_lines() -> None:
    secret = "hunter2-sup3r-s3cret"
    redactor = Redactor([secret])
    cases = [
        [vtx("a", "[1/2] RUN make", 0.0, **STEP)]
        + [log("a", 0.1, b"out %d\n" % i) for i in range(60)]
        + [vtx("c", "[2/2] RUN other", 0.0, **STEP), log("c", 0.2, b"cancelled step's output\n"),
           vtx("c", "[2/2] RUN other", 0.0, 0.5, error="context canceled", **STEP),
           vtx("a", "[1/2] RUN make", 0.0, 1.0, error="process did not complete successfully", **STEP),
           vtx("z", "later", 2.0, **STEP), log("z", 2.1, b"unrelated\n")],
        [vtx("a", "A", 0.0, **STEP), log("a", 0.1, b"one\n"), vtx("b", "B", 0.2, **STEP),
         log("b", 0.3, b"two\npar")],
        [vtx("a", "A", 0.0, **STEP), log("a", 0.1, f"token={secret[:7]}".encode()),
         log("a", 0.2, f"{secret[7:]} ok\n\n".encode()), log("a", 0.3, b"x" * (2 * MAX_PARTIAL_BYTES + 5)),
         log("a", 0.4, "é".encode() * MAX_PARTIAL_BYTES),
         vtx("a", "A", 0.0, 1.0, error="exit code: 2", **STEP)],
        [vtx("a", "A", None), log("a", 0.1, b"not started: dropped by neither\n"), vtx("a", "A", 0.0, **STEP),
         log("a", 0.2, b"a's\n"), vtx("b", "B", 0.3, **STEP), log("b", 0.4, b"b's\n"),
         vtx("a", "A", None, error="redeclared")],
    ]  # fmt: skip
    for lines in cases:
        tails, renderer = tails_and_renderer(redactor.redact, redactor.safe_cut)
        for line in lines:
            status = parse_line(line)
            assert status is not None
            tails.feed(status)
            renderer.feed(status)
        got = tails.failing_tail(30)
        assert got == renderer.end(30)[1] and got
        assert secret not in "".join(got)
    assert OutputTails().failing_tail() == []

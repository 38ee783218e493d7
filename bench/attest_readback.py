"""What reading a pushed index back costs a worker (docs/attestations.md): ``read_pushed`` timed
against a real ``docker-registry`` on loopback holding the genuine captures (tests/fixtures/attest/).

    .venv/bin/python bench/attest_readback.py [--rounds 200]

Prints, per capture, the documents read and the median / p95 / max milliseconds of one read back
(index, then each attestation manifest): the time a successful multi-platform or attested build
spends between buildctl's exit and its record, on top of what it spent before this feature.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buildq.registry import RegistryReader, read_pushed  # noqa: E402
from tests.attest_fixtures import seed_registry  # noqa: E402
from tests.genuine import Registry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="buildq-bench-") as work:
        registry = Registry(Path(work) / "registry")
        try:
            for name in ("multiplatform", "provenance_max", "sbom"):
                digest = seed_registry(registry.host, f"bench/{name}", name, "1")
                times = []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    pushed = read_pushed(
                        RegistryReader(f"{registry.host}/bench/{name}:1", insecure=True), digest
                    )
                    times.append((time.perf_counter() - started) * 1000)
                times.sort()
                documents = 1 + len(pushed.attestations)
                p95 = times[int(0.95 * len(times)) - 1]
                what = f"{len(pushed.platforms)} platform(s), {len(pushed.attestations)} attestation(s)"
                print(
                    f"{name:15s} {what}, {documents} manifest read(s): median "
                    f"{statistics.median(times):.2f} ms, p95 {p95:.2f} ms, max {times[-1]:.2f} ms "
                    f"over {args.rounds}"
                )
        finally:
            registry.stop()


if __name__ == "__main__":
    main()

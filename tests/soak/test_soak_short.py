"""The soak in `make test`: the same driver and criteria as `make soak`, for about 24 seconds.

Looser on memory (RSS may grow 15% instead of 10%), and its baseline is taken only after half
the run: until the allocator has seen every upload size and level of concurrency, quiet-point
RSS climbs by several MiB whatever the code (glibc keeps 128-256 KiB read buffers in its heap;
the proxy returns free pages every second, cli.heap_trimmer). With a 6-second warm-up it grew
+10% to +18% in 20 s here and failed once in a full run; after 12 of 24 s, -0.9% to +3.2%. So
the short run only catches a gross leak (16 KiB per operation is about +20% over its ~700
measured operations); `make soak` (300 s, 10%) is the run for a slow one. The other criteria,
file descriptors included, are the same.
"""

from __future__ import annotations

from tests.soak.driver import SoakConfig, run_soak


async def test_short_soak_meets_every_criterion() -> None:
    report = await run_soak(SoakConfig.short())
    print(report.render())  # shown by pytest when the test fails
    assert report.failures() == [], report.render()

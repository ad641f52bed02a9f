"""The soak in `make test`: the same driver and criteria as `make soak`, for about 20 seconds.

Looser on memory (RSS may grow 15% instead of 10%): the baseline is taken after a 6-second
warm-up, before the allocator has seen every upload size and every level of concurrency, and
quiet-point RSS then still grows by a few MiB (+4% to +8% in 20-second runs here, -2% over
300 seconds). So the short run only catches a gross leak (16 KiB per operation is about +20%
over its ~1,200 operations); `make soak` (300 s, ~60,000 operations, 10%) catches one of about
170 bytes. The other criteria, file descriptors included, are the same.
"""

from __future__ import annotations

from tests.soak.driver import SoakConfig, run_soak


async def test_short_soak_meets_every_criterion() -> None:
    report = await run_soak(SoakConfig.short())
    print(report.render())  # shown by pytest when the test fails
    assert report.failures() == [], report.render()

"""Container HEALTHCHECK: exit 0 when the proxy's /health/live answers 200, else 1.

Liveness, not readiness: an Entra outage must not mark the container unhealthy (a restart would
not fix it). Uses only the standard library, because slim images have no curl, and writes
nothing, so it works on a read-only root filesystem. It asks the admin listener when
PROXY_ADMIN_PORT is set, else the proxy port; probes never need the inbound key.
"""

import os
import sys
import urllib.request

WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


def main() -> int:
    if os.environ.get("PROXY_ADMIN_PORT"):
        host = os.environ.get("PROXY_ADMIN_HOST", "0.0.0.0")  # noqa: S104
        port = os.environ["PROXY_ADMIN_PORT"]
    else:
        host = os.environ.get("HOST", "127.0.0.1")
        port = os.environ.get("PORT") or "8080"
    host = WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/health/live"
    # The environment may name an egress proxy (HTTPS_PROXY and friends): never use it here.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

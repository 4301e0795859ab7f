"""The floor the hit path is measured against: a bare redis-py single consumer loop.

    python benchmarks/bare_consumer.py URL REQUESTS GROUP RESULTS KEY

Per XREADGROUP (COUNT 100) batch, per event: decode the request's JSON, GET `KEY`, then one
MULTI { XADD the result to RESULTS, XACK }. The result carries `request_id`, `status`, `cache`
and `latency_ms` (entry id time -> this XADD), like the service's, so benchmarks/hit_path.py
reads and measures it the same way. Runs until SIGTERM. No cache logic, no persister, no
change events: what one Python process with redis-py can do at best for an exact hit.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import redis


def main(argv: list[str]) -> int:
    url, requests, group, results, key = argv
    client = redis.Redis.from_url(url, socket_timeout=10)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        reply = client.xreadgroup(group, "bare", {requests: ">"}, count=100, block=500)
        for _, entries in reply or []:
            for mid, fields in entries:
                request = json.loads(fields[b"data"])
                client.get(key)
                entry_ms = int(mid.split(b"-", 1)[0])
                result = json.dumps({"request_id": request["request_id"], "status": "ok",
                                     "cache": "exact",
                                     "latency_ms": round(time.time() * 1000 - entry_ms, 2)})
                with client.pipeline(transaction=True) as pipe:
                    pipe.xadd(results, {"data": result})
                    pipe.xack(requests, group, mid)
                    pipe.execute()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

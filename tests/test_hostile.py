"""Hostile input against a running worker process: arbitrary stream entries (hypothesis), MB-sized
values, deeply nested JSON, invalid UTF-8 and a flood of one request_id. Every entry ends as a
result or a dead letter, nothing stays pending, no request_id is answered twice, the worker keeps
running and its memory (RSS) stays flat across batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as syncredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptcache import intake
from promptcache.keys import GENERATE_GROUP, REQUESTS_GROUP, Keys
from tests.helpers import process_env

pytestmark = pytest.mark.slow


@dataclass
class Running:
    keys: Keys
    proc: subprocess.Popen[bytes]
    r: syncredis.Redis

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    tmp = tmp_path_factory.mktemp("hostile")
    env = process_env(REDIS_URL=redis_url, PROMPTCACHE_PREFIX=keys.prefix,
                      PROMPTCACHE_DATA_DIR=str(tmp / "data"), PROMPTCACHE_GENERATOR_LATENCY_MS="0",
                      PROMPTCACHE_BLOCK="100ms", PROMPTCACHE_LOG_LEVEL="ERROR",
                      PROMPTCACHE_EMBEDDINGS="off")
    with open(tmp / "worker.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ops", "worker"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    r = syncredis.Redis.from_url(redis_url)
    try:
        yield Running(keys, proc, r)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        r.close()


def _request_id(fields: dict[bytes, bytes]) -> str | None:
    """The id the worker answers, as its decoder finds it (also in a broken or oversized entry);
    None: the entry must be dead-lettered."""
    decoded = intake.decode(fields)
    return None if isinstance(decoded, intake.Undeliverable) else decoded.request_id


def _group_done(r: syncredis.Redis, stream: str, group: str) -> bool:
    try:
        info = next(g for g in r.xinfo_groups(stream) if g["name"] == group.encode())
    except (StopIteration, syncredis.ResponseError):
        return stream.endswith(":generate")  # no job handed off yet
    return info["pending"] == 0 and (info["lag"] or 0) == 0


@dataclass
class Outcome:
    """What became of a pushed batch: the entries' stream ids, the new results by request id,
    the new dead letters by the stream id of the entry they hold."""

    ids: list[str]
    results: dict[str, list[dict[str, object]]]
    letters: dict[str, dict[str, object]]


def push_and_check(w: Running, entries: list[dict[bytes, bytes]], timeout: float = 60) -> Outcome:
    """XADD the entries, wait until the worker has dealt with all of them, check each one."""
    last_result = (w.r.xrevrange(w.keys.results, count=1) or [(b"0-0", {})])[0][0].decode()
    last_letter = (w.r.xrevrange(w.keys.dead_letter, count=1) or [(b"0-0", {})])[0][0].decode()
    ids = [w.r.xadd(w.keys.requests, fields).decode() for fields in entries]
    deadline = time.monotonic() + timeout
    while not (_group_done(w.r, w.keys.requests, REQUESTS_GROUP)
               and _group_done(w.r, w.keys.generate, GENERATE_GROUP)):
        assert w.proc.poll() is None, "the worker died"
        assert time.monotonic() < deadline, "entries left unprocessed"
        time.sleep(0.05)
    assert w.proc.poll() is None, "the worker died"
    letters = {json.loads(f[b"data"])["message_id"] for _, f in w.r.xrange(w.keys.dead_letter)}
    answered = Counter(json.loads(f[b"data"])["request_id"] for _, f in w.r.xrange(w.keys.results))
    assert [rid for rid, n in answered.items() if n > 1] == [], "a request_id answered twice"
    for mid, fields in zip(ids, entries, strict=True):
        rid = _request_id(fields)
        assert mid in letters or (rid is not None and answered[rid] == 1), (mid, fields)
    new = Outcome(ids, {}, {})
    for _, f in w.r.xrange(w.keys.results, min=f"({last_result}"):
        result = json.loads(f[b"data"])
        new.results.setdefault(result["request_id"], []).append(result)
    for _, f in w.r.xrange(w.keys.dead_letter, min=f"({last_letter}"):
        letter = json.loads(f[b"data"])
        new.letters[letter["message_id"]] = letter
    return new


# --- hypothesis: arbitrary entries ---------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=40)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=15)
_ids = st.text(alphabet="abcXYZ019-_:. !é", min_size=0, max_size=12) | st.integers()
_requests = st.fixed_dictionaries(
    {"request_id": _ids, "prompt": st.text(max_size=120) | _json},
    optional={"params": st.dictionaries(st.sampled_from(["width", "height", "seed", "steps",
                                                         "model", "clip_skip", "guidance"]),
                                        _json, max_size=3),
              "negative_prompt": st.text(max_size=40) | _json,
              "options": st.dictionaries(st.sampled_from(["cache", "optimize", "x"]), _json,
                                         max_size=2)})
_data = st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode()),
                  _requests.map(lambda v: json.dumps(v).encode()),
                  _requests.map(lambda v: json.dumps(v).encode()[:-3] + b"\xff\xfe"))
_entries = st.dictionaries(st.sampled_from([b"data", b"other"]) | st.binary(min_size=1, max_size=6),
                           _data, min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(batch=st.lists(_entries, min_size=1, max_size=12))
def test_arbitrary_entries_each_end_as_a_result_or_a_dead_letter(worker, batch):
    answered_before = {json.loads(f[b"data"])["request_id"]
                       for _, f in worker.r.xrange(worker.keys.results)}
    outcome = push_and_check(worker, batch)
    decoded = [intake.decode(fields) for fields in batch]
    ids = Counter(d.request_id for d in decoded if not isinstance(d, intake.Undeliverable))
    assert set(outcome.results) == set(ids) - answered_before  # a result for each new id only
    for mid, fields, d in zip(outcome.ids, batch, decoded, strict=True):
        if isinstance(d, intake.Undeliverable):  # a dead letter, with the decoder's reason
            assert outcome.letters[mid]["error"]["code"] == d.error.code, (fields, outcome)
        elif ids[d.request_id] == 1 and d.request_id not in answered_before:
            [result] = outcome.results[d.request_id]
            if isinstance(d, intake.Rejected):  # refused for the reason the decoder found
                assert result["status"] == "rejected", (fields, result)
                assert result["error"]["code"] == d.error.code, (fields, result)
            else:
                assert result["status"] in ("ok", "rejected"), (fields, result)


# --- the nasty cases, repeated: memory stays flat --------------------------------------------------

def _nasty_batch(round_no: int) -> list[dict[bytes, bytes]]:
    big = json.dumps({"request_id": f"big-{round_no}", "prompt": "x" * 2_000_000}).encode()
    nested = b'{"request_id": "nest-%d", "prompt": ' % round_no + b"[" * 200_000 + b"]" * 200_000
    flood = json.dumps({"request_id": f"flood-{round_no}", "prompt": "one id, many times"}).encode()
    return ([{b"data": big}] * 5 + [{b"data": os.urandom(3_000_000)}] * 3
            + [{b"data": nested + b"}"}, {b"data": b"[" * 1_000_000}]
            + [{b"data": b'{"request_id": "utf-%d", "prompt": "\xff\xfe\xc3("}' % round_no}]
            + [{b"data": flood}] * 300)


def test_oversized_nested_invalid_utf8_and_a_flood_keep_memory_flat(worker):
    push_and_check(worker, _nasty_batch(0))  # warm-up: imports, pools, allocator arenas
    push_and_check(worker, _nasty_batch(1))
    before = worker.rss_kb()
    for round_no in range(2, 7):
        push_and_check(worker, _nasty_batch(round_no))
    after = worker.rss_kb()
    print(f"worker RSS {before} kB -> {after} kB over 5 rounds")
    # A memory bound, not a clock: holding on to anything of each round (its 10 MB of prompts,
    # 9 MB of random bytes) would grow by five rounds' worth; less than two rounds' input is
    # allocator noise.
    round_kb = sum(len(v) for entry in _nasty_batch(0) for v in entry.values()) // 1024
    assert after - before < 2 * round_kb, f"RSS grew from {before} kB to {after} kB"
    results = [json.loads(f[b"data"]) for _, f in worker.r.xrange(worker.keys.results)]
    by_id = {x["request_id"]: x for x in results}
    assert by_id["big-3"]["error"]["code"] == "request_too_large"
    assert by_id["flood-3"]["status"] == "ok"
    assert sum(x["request_id"] == "flood-3" for x in results) == 1

-- Hourly rollups written by the persister from the change stream.

-- Change events already applied (stream entry ids): makes the rollups idempotent under
-- redelivery. The janitor deletes rows older than two days.
CREATE TABLE IF NOT EXISTS applied_changes (
    event_id   text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS applied_changes_at ON applied_changes (applied_at);

-- Results per hour by cache tier ('' when not ok) and status, with a latency histogram
-- (bucket upper bounds in consumers/storage/stats.py, the last bucket is +Inf).
CREATE TABLE IF NOT EXISTS stats_hourly (
    hour                       timestamptz NOT NULL,
    tier                       text NOT NULL,
    status                     text NOT NULL,
    requests                   bigint NOT NULL DEFAULT 0,
    latency_ms_sum             double precision NOT NULL DEFAULT 0,
    latency_buckets            bigint[] NOT NULL,
    generator_calls            bigint NOT NULL DEFAULT 0,
    generator_seconds          double precision NOT NULL DEFAULT 0,
    generator_seconds_avoided  double precision NOT NULL DEFAULT 0,
    bytes_stored               bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, tier, status)
);

CREATE TABLE IF NOT EXISTS evictions_hourly (
    hour        timestamptz NOT NULL,
    reason      text NOT NULL,
    evictions   bigint NOT NULL DEFAULT 0,
    bytes_freed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, reason)
);

-- Review and invalidation (issue 7).

-- The request whose miss generated each entry (from entry_stored events). With cache_hits
-- (every later hit) it answers "which requests was this image served to", also after the
-- entry itself has been evicted.
CREATE TABLE IF NOT EXISTS entry_origins (
    entry_id    text PRIMARY KEY,
    request_id  text NOT NULL,
    tier        text NOT NULL,
    latency_ms  double precision,
    at          timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS entry_origins_request ON entry_origins (request_id);
CREATE INDEX IF NOT EXISTS cache_hits_request ON cache_hits (request_id);

-- Images an operator flagged as bad: evicted, and their blob never served again.
CREATE TABLE IF NOT EXISTS flagged_entries (
    entry_id     text PRIMARY KEY,
    blob_sha256  text NOT NULL,
    cache_key    text,
    prompt       text,
    reason       text,
    flagged_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS flagged_entries_blob ON flagged_entries (blob_sha256);

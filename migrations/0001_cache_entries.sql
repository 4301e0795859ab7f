-- Durable metadata of cached images. Written by the persister from the change stream.
CREATE TABLE IF NOT EXISTS cache_entries (
    entry_id          text PRIMARY KEY,
    cache_key         text NOT NULL,
    prompt            text NOT NULL,
    canonical_prompt  text NOT NULL,
    negative_prompt   text,
    params            jsonb NOT NULL,
    optimizer_version text NOT NULL,
    generator         text NOT NULL,
    blob_sha256       text NOT NULL,
    content_type      text NOT NULL,
    width             integer NOT NULL,
    height            integer NOT NULL,
    image_bytes       bigint NOT NULL,
    thumbnail_bytes   bigint NOT NULL,
    generation_ms     double precision,
    created_at        timestamptz NOT NULL,
    last_used_at      timestamptz NOT NULL,
    hit_count         bigint NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS cache_entries_cache_key ON cache_entries (cache_key);
CREATE INDEX IF NOT EXISTS cache_entries_last_used ON cache_entries (last_used_at);
CREATE INDEX IF NOT EXISTS cache_entries_blob ON cache_entries (blob_sha256);

-- One row per cache hit event (exact, semantic, coalesced), for statistics and "who got this image".
CREATE TABLE IF NOT EXISTS cache_hits (
    entry_id    text NOT NULL,
    request_id  text NOT NULL,
    tier        text NOT NULL,
    latency_ms  double precision,
    at          timestamptz NOT NULL,
    PRIMARY KEY (entry_id, request_id)
);
CREATE INDEX IF NOT EXISTS cache_hits_at ON cache_hits (at);

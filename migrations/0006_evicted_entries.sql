-- Evicted entries, remembered for a while (issue 15): with sharded streams an entry's
-- `entry_stored` and its `entry_evicted` travel on different change streams, so a persister can
-- read the eviction first. The store of an entry remembered here is not written (it would be
-- a row for an entry that no longer exists). Pruned with applied_changes.
CREATE TABLE IF NOT EXISTS evicted_entries (
    entry_id   text PRIMARY KEY,
    evicted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS evicted_entries_at ON evicted_entries (evicted_at);

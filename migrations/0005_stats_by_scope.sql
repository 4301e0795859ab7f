-- Statistics per scope (issue 16): every hourly result row belongs to one scope ('' for the
-- shared scope, which is what every row before this migration was).
ALTER TABLE stats_hourly ADD COLUMN IF NOT EXISTS scope text NOT NULL DEFAULT '';
ALTER TABLE stats_hourly DROP CONSTRAINT IF EXISTS stats_hourly_pkey;
ALTER TABLE stats_hourly ADD PRIMARY KEY (hour, scope, tier, status);
-- and every entry (NULL: the shared scope)
ALTER TABLE cache_entries ADD COLUMN IF NOT EXISTS scope text;
CREATE INDEX IF NOT EXISTS cache_entries_scope ON cache_entries (scope) WHERE scope IS NOT NULL;

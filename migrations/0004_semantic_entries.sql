-- The durable copy of the semantic index (issue 3): each entry's canonical prompt embedding,
-- the model that made it and the params partition it may be compared in. pgvector's `vector`
-- where the server has the extension (and we may create it), a plain real[] otherwise; the
-- persister reads which one this database got.
DO $$
DECLARE
    has_vector boolean := false;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS vector;
            has_vector := true;
        EXCEPTION WHEN insufficient_privilege OR feature_not_supported THEN
            RAISE NOTICE 'pgvector is available but cannot be created here: using real[]';
        END;
    END IF;
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS semantic_entries ('
        '  entry_id         text PRIMARY KEY,'
        '  cache_key        text NOT NULL,'
        '  partition        text NOT NULL,'
        '  model            text NOT NULL,'
        '  dim              integer NOT NULL,'
        '  canonical_prompt text NOT NULL,'
        '  embedding        %s NOT NULL,'
        '  created_at       timestamptz NOT NULL'
        ')', CASE WHEN has_vector THEN 'vector' ELSE 'real[]' END);
END
$$;
CREATE INDEX IF NOT EXISTS semantic_entries_partition ON semantic_entries (model, partition);

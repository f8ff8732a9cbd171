-- Locks the operator takes, as row locks on this table (never advisory
-- locks: any role can take any advisory key, so a tenant could stall the
-- operator). One row per (kind, key), created on first use with
-- INSERT ... ON CONFLICT DO NOTHING and locked with SELECT ... FOR UPDATE
-- (NOWAIT or under a lock_timeout) in the transaction it protects. No tenant
-- role can reach the table (the schema is closed to PUBLIC). Kinds:
-- 'database-acl' (key: the database's name) serializes GRANT/REVOKE ... ON
-- DATABASE and DROP OWNED BY (Postgres refuses a concurrent update of the
-- pg_database row with "tuple concurrently updated"). Runs with
-- search_path = tenancy; IF NOT EXISTS because other changes may add the
-- same table.
CREATE TABLE IF NOT EXISTS tenancy.locks (
    kind text NOT NULL,
    key  text NOT NULL,
    PRIMARY KEY (kind, key)
);

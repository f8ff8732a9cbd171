-- The last failed (or refused) migration of each tenant, written and cleared
-- by the MigrationSet rollout (and by a Tenant's first migration run); read
-- by the Tenant controller for its MigrationsApplied condition. Keyed by the
-- tenant's name; the row goes with the tenant's delete. Runs with
-- search_path = tenancy.
CREATE TABLE IF NOT EXISTS tenancy.migration_failures (
    tenant_name    text PRIMARY KEY,
    migration_set  text NOT NULL,
    set_generation bigint NOT NULL,
    version        bigint NOT NULL,
    migration_name text NOT NULL,
    reason         text NOT NULL CHECK (reason IN ('MigrationFailed', 'ChecksumMismatch')),
    error          text NOT NULL,
    sqlstate       text,
    failed_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS migration_failures_set ON tenancy.migration_failures (migration_set, set_generation);

-- The migrations each tenant schema has applied, as the operator records
-- them: what MigrationSet and Tenant statuses (and backups) report, read by
-- the admin without touching anything inside a tenant schema (where an
-- owner-written view, trigger or RLS policy would run as the admin).
-- Written by the admin right after a migration's transaction commits on the
-- tenant's confined session, and re-synced from <schema>._tenancy_migrations
-- (read on that session, under the tenant's migration lock) when the two
-- differ (a crash between the two commits). The rows go with the registry
-- row. Runs with search_path = tenancy.
CREATE TABLE IF NOT EXISTS tenancy.schema_versions (
    tenant_uid  text NOT NULL REFERENCES tenancy.tenants (uid) ON DELETE CASCADE,
    version     bigint NOT NULL,
    name        text NOT NULL,
    checksum    text NOT NULL,
    -- NULL for a row re-synced from the schema's own version table.
    duration_ms bigint,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_uid, version)
);

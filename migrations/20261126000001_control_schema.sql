-- The operator's own bookkeeping. Runs with search_path = tenancy.
CREATE TABLE IF NOT EXISTS tenancy.tenants (
    uid         text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    schema_name text NOT NULL UNIQUE,
    state       text NOT NULL CHECK (state IN ('Active', 'Suspended')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Who did what to which tenant, and when. After a tenant's delete its rows
-- keep only the uid: the name is cleared with the registry row.
CREATE TABLE IF NOT EXISTS tenancy.audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    tenant_uid  text NOT NULL,
    tenant_name text,
    action      text NOT NULL,
    actor       text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS audit_log_tenant_uid ON tenancy.audit_log (tenant_uid, at);

-- Tables of a tenant whose writes are not audited (spec.audit.excludeTables,
-- docs/audit.md "Cost"): kept in the registry by the Tenant reconcile, read
-- with the tenant's ops login by every migration, so a migration's
-- in-transaction audit check leaves them untriggered too. Runs with
-- search_path = tenancy.
ALTER TABLE tenancy.tenants ADD COLUMN IF NOT EXISTS audit_exclude text[] NOT NULL DEFAULT '{}';

-- Per-tenant backups the `backup` subcommand took and has not pruned: one row
-- per object pair tenants/<uid>/<id>.dump.enc + <id>.manifest.json in the
-- backup store. Read by the Tenant controller for status.lastBackup; the rows
-- go with the registry row when the tenant is deleted (its backups are
-- deleted from the store by the delete finalizer). Runs with
-- search_path = tenancy.
CREATE TABLE IF NOT EXISTS tenancy.backups (
    tenant_uid  text NOT NULL REFERENCES tenancy.tenants (uid) ON DELETE CASCADE,
    id          text NOT NULL,
    taken_at    timestamptz NOT NULL,
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    key_version integer NOT NULL,
    PRIMARY KEY (tenant_uid, id)
);

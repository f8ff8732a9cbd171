-- Locks the operator takes, as row locks (SELECT ... FOR UPDATE NOWAIT, or
-- FOR SHARE) held by an open transaction of the admin: one row per (kind,
-- key), e.g. ('migrate', <tenant uid>), ('restore', <tenant uid>). Unlike
-- advisory locks, which any role may take with any key, nobody but the
-- operator can lock these rows: the control schema is closed to PUBLIC.
-- Runs with search_path = tenancy.
CREATE TABLE IF NOT EXISTS tenancy.locks (
    kind text NOT NULL,
    key  text NOT NULL,
    PRIMARY KEY (kind, key)
);

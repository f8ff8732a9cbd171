DO $tenancy_prep$
DECLARE
  v_role text := {{prefix}} || (SELECT oid FROM pg_database WHERE datname = current_database())::text;
BEGIN
  -- Every grant is made only when missing: a GRANT rewrites its object's
  -- catalog row even when the right is already there, and a start on a
  -- prepared database writes no catalog row.
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
    EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
    EXECUTE format('COMMENT ON ROLE %I IS %L', v_role, 'tenancy.dev: owns the audit anchor functions of database ' || current_database());
  END IF;
  IF NOT pg_has_role(current_user, v_role, 'MEMBER') THEN
    EXECUTE format('GRANT %I TO %I', v_role, current_user);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a
                  WHERE n.nspname = 'tenancy' AND a.grantee = v_role::regrole AND a.privilege_type = 'USAGE') THEN
    EXECUTE format('GRANT USAGE ON SCHEMA tenancy TO %I', v_role);
  END IF;
  IF (SELECT count(DISTINCT a.privilege_type) FROM pg_class c, aclexplode(c.relacl) a
       WHERE c.oid = 'tenancy.audit_heads'::regclass AND a.grantee = v_role::regrole
         AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE')) < 3 THEN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON tenancy.audit_heads TO %I', v_role);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = {{schema}}) THEN
    EXECUTE format('CREATE SCHEMA %I', {{schema}});
  END IF;
  -- Only so that the anchor functions can be given to the role (a new
  -- owner needs CREATE on the schema); nobody logs in as it.
  IF (SELECT count(DISTINCT a.privilege_type) FROM pg_namespace n, aclexplode(n.nspacl) a
       WHERE n.nspname = {{schema}} AND a.grantee = v_role::regrole AND a.privilege_type IN ('USAGE', 'CREATE')) < 2 THEN
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', {{schema}}, v_role);
  END IF;
  -- Every tenant owner calls its own function here: USAGE for everyone,
  -- once, rather than one ACL entry per tenant on the schema's catalog row
  -- (a grant per tenant made concurrent reconciles fail with "tuple
  -- concurrently updated", and 10,000 entries would bloat the row). The
  -- schema holds only the anchor functions, whose EXECUTE is each revoked
  -- from PUBLIC and granted to one owner.
  IF NOT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a
                  WHERE n.nspname = {{schema}} AND a.grantee = 0 AND a.privilege_type = 'USAGE') THEN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO PUBLIC', {{schema}});
  END IF;
END
$tenancy_prep$

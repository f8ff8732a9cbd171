DO $tenancy_prep$
DECLARE
  v_role text := {{prefix}} || (SELECT oid FROM pg_database WHERE datname = current_database())::text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
    EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
    EXECUTE format('COMMENT ON ROLE %I IS %L', v_role, 'tenancy.dev: owns the audit anchor functions of database ' || current_database());
  END IF;
  IF NOT pg_has_role(current_user, v_role, 'MEMBER') THEN
    EXECUTE format('GRANT %I TO %I', v_role, current_user);
  END IF;
  EXECUTE format('GRANT USAGE ON SCHEMA tenancy TO %I', v_role);
  EXECUTE format('GRANT SELECT, INSERT, UPDATE ON tenancy.audit_heads TO %I', v_role);
  IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = {{schema}}) THEN
    EXECUTE format('CREATE SCHEMA %I', {{schema}});
  END IF;
  -- Only so that the anchor functions can be given to the role (a new
  -- owner needs CREATE on the schema); nobody logs in as it.
  EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', {{schema}}, v_role);
  -- Every tenant owner calls its own function here: USAGE for everyone,
  -- once, rather than one ACL entry per tenant on the schema's catalog row
  -- (a grant per tenant made concurrent reconciles fail with "tuple
  -- concurrently updated", and 10,000 entries would bloat the row). The
  -- schema holds only the anchor functions, whose EXECUTE is each revoked
  -- from PUBLIC and granted to one owner.
  EXECUTE format('GRANT USAGE ON SCHEMA %I TO PUBLIC', {{schema}});
END
$tenancy_prep$

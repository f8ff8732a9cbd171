BEGIN
  -- Pruning (as the owner, with the setting on) is the only delete.
  IF TG_OP = 'DELETE' AND current_user = {{owner}} AND current_setting('tenancy.audit_prune', true) = 'on' THEN
    RETURN NULL;
  END IF;
  RAISE EXCEPTION 'the audit log %.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END

BEGIN
  -- Two deletes only, as the owner with the matching setting on: pruning
  -- the log, and the seal taking what it sealed out of the pending table.
  IF TG_OP = 'DELETE' AND current_user = {{owner}}
     AND ((TG_TABLE_NAME = {{audit_table}} AND current_setting('tenancy.audit_prune', true) = 'on')
       OR (TG_TABLE_NAME = {{pending_table}} AND current_setting({{seal_setting}}, true) = 'on')) THEN
    RETURN NULL;
  END IF;
  RAISE EXCEPTION 'the audit log %.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END

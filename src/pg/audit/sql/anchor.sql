BEGIN
  IF p_last_id IS NULL OR p_last_id < 0 OR p_hash IS NULL OR octet_length(p_hash) <> 32 THEN
    RAISE EXCEPTION 'not an audit chain head: row %', p_last_id USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO tenancy.audit_heads AS h (tenant_uid, last_id, hash, moved_at) VALUES ({{uid}}, p_last_id, p_hash, now())
  ON CONFLICT (tenant_uid) DO UPDATE SET last_id = excluded.last_id, hash = excluded.hash, moved_at = excluded.moved_at
   WHERE h.last_id < excluded.last_id OR (h.last_id = excluded.last_id AND h.hash = excluded.hash);
  IF NOT FOUND THEN
    RAISE EXCEPTION 'the audit chain head of tenant % cannot move back or be rewritten (to row %)', {{tenant}}, p_last_id
      USING ERRCODE = 'insufficient_privilege';
  END IF;
END

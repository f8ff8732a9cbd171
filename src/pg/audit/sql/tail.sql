DECLARE
  v_last bigint;
  v_hash bytea;
BEGIN
  SELECT a.id, a.hash INTO v_last, v_hash FROM {{schema}}.{{audit_table}} a ORDER BY a.id DESC LIMIT 1;
  IF v_last IS NOT NULL THEN
    -- The head by its key, through its index (see the append).
    UPDATE {{schema}}.{{head_table}} SET last_id = v_last, hash = v_hash
     WHERE one AND (last_id IS DISTINCT FROM v_last OR hash IS DISTINCT FROM v_hash);
    PERFORM {{anchor}}(v_last, v_hash);
  END IF;
  RETURN NULL;
END

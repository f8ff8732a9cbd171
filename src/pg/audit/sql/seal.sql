DECLARE
  v_last bigint;
  v_hash bytea;
  v_pids bigint[] := '{}';
  v_prevs bytea[] := '{}';
  v_hashes bytea[] := '{}';
  v_i integer := 0;
  r record;
BEGIN
  -- One seal at a time: the head's row lock, held to commit. A committing
  -- writer does not wait for it (p_wait false: its entries are sealed by
  -- whoever seals next); the operator does. The head is found by its key,
  -- through its index: a head updated at every commit leaves dead
  -- versions, which a scan of the table would read every time.
  IF p_wait THEN
    PERFORM 1 FROM {{schema}}.{{head_table}} h WHERE h.one FOR UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'the audit chain head %.{{head_table}} has no row', {{schema_lit}}
        USING ERRCODE = 'no_data_found';
    END IF;
  ELSE
    PERFORM 1 FROM {{schema}}.{{head_table}} h WHERE h.one FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
      RETURN 0;
    END IF;
  END IF;
  SELECT a.hash INTO v_hash FROM {{schema}}.{{audit_table}} a ORDER BY a.id DESC LIMIT 1;
  v_hash := coalesce(v_hash, decode(repeat('00', 32), 'hex'));
  -- Every pending entry this statement sees (committed, or this
  -- transaction's), in the order they were appended.
  FOR r IN SELECT p.pid, {{content}} AS content FROM {{schema}}.{{pending_table}} p ORDER BY p.pid LOOP
    v_i := v_i + 1;
    v_pids[v_i] := r.pid;
    v_prevs[v_i] := v_hash;
    v_hash := sha256(v_hash || r.content);
    v_hashes[v_i] := v_hash;
  END LOOP;
  IF v_i = 0 THEN
    RETURN 0;
  END IF;
  -- Ids are drawn in that order: the chain's order.
  INSERT INTO {{schema}}.{{audit_table}} ("time", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, prev_hash, hash)
  SELECT p."time", p.actor, p.actor_given, p.request_id, p.operation, p.table_name, p.row_pk, p.changed_columns, u.prev, u.hash
    FROM unnest(v_pids, v_prevs, v_hashes) WITH ORDINALITY AS u(pid, prev, hash, n)
    JOIN {{schema}}.{{pending_table}} p ON p.pid = u.pid
   ORDER BY u.n;
  PERFORM set_config({{seal_setting}}, 'on', true);
  DELETE FROM {{schema}}.{{pending_table}} p WHERE p.pid = ANY (v_pids);
  PERFORM set_config({{seal_setting}}, 'off', true);
  SELECT a.id INTO v_last FROM {{schema}}.{{audit_table}} a ORDER BY a.id DESC LIMIT 1;
  UPDATE {{schema}}.{{head_table}} SET last_id = v_last, hash = v_hash
   WHERE one AND (last_id IS DISTINCT FROM v_last OR hash IS DISTINCT FROM v_hash);
  PERFORM {{anchor}}(v_last, v_hash);
  RETURN v_i;
END

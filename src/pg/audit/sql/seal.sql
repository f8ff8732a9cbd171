DECLARE
  v_last bigint;
  v_hash bytea;
  v_pids bigint[] := '{}';
  v_rows tid[] := '{}';
  v_prevs bytea[] := '{}';
  v_hashes bytea[] := '{}';
  v_i integer := 0;
  r record;
  v_floor xid8;
  v_next xid8;
  v_seqscan text := current_setting('enable_seqscan');
  v_plans text := current_setting('plan_cache_mode');
BEGIN
  -- One seal at a time: the head's row lock, held to commit. A committing
  -- writer does not wait for it (p_wait false: its entries are sealed by
  -- whoever seals next); the operator does. The head is found by its key,
  -- through its index: a head updated at every commit leaves dead
  -- versions, which a scan of the table would read every time.
  IF p_wait THEN
    SELECT h.last_id, h.hash INTO v_last, v_hash FROM {{schema}}.{{head_table}} h WHERE h.one FOR UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'the audit chain head %.{{head_table}} has no row', {{schema_lit}}
        USING ERRCODE = 'no_data_found';
    END IF;
  ELSE
    SELECT h.last_id, h.hash, h.seal_floor INTO v_last, v_hash, v_floor
      FROM {{schema}}.{{head_table}} h WHERE h.one FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
      RETURN 0;
    END IF;
    -- A floor beyond this transaction's own id was not set on this server
    -- (the schema was restored or moved here): not used.
    IF v_floor > pg_current_xact_id() THEN
      v_floor := NULL;
    END IF;
  END IF;
  -- The head holds the chain's last row (every seal moves it; a prune's
  -- ANCHOR row lies before it).
  -- The next seal's floor: the oldest transaction id running now (the
  -- snapshot's xmin: transactions with an id, i.e. writers; a read-only
  -- snapshot such as a backup's has none), or this transaction's own if
  -- lower (its later entries would follow its seal). Every transaction
  -- below it has ended, so the scan below (a later snapshot) sees and
  -- seals what it appended; what is left or to come is at or above it.
  v_next := least(pg_snapshot_xmin(pg_current_snapshot()), pg_current_xact_id_if_assigned());
  -- Every pending entry this statement sees (committed, or this
  -- transaction's) at or above the last seal's floor, through the
  -- (xid, pid) index: by transaction id, then in the order each
  -- transaction appended them. The dead rows the seals left below the
  -- floor are not read (a scan of the table read every one since the last
  -- vacuum, and a snapshot held elsewhere, such as a backup's, keeps
  -- vacuum from removing them). The operator's seal (p_wait) reads them
  -- all. Planned on the index whatever the table's statistics say (a plan
  -- made when the table was empty would scan it while it grows), and so is
  -- the move below.
  PERFORM set_config('enable_seqscan', 'off', true), set_config('plan_cache_mode', 'force_generic_plan', true);
  FOR r IN SELECT p.ctid, p.pid, {{content}} AS content FROM {{schema}}.{{pending_table}} p
            WHERE p.xid >= coalesce(v_floor, '0'::xid8) ORDER BY p.xid, p.pid LOOP
    v_i := v_i + 1;
    v_rows[v_i] := r.ctid;
    v_pids[v_i] := r.pid;
    v_prevs[v_i] := v_hash;
    v_hash := sha256(v_hash || r.content);
    v_hashes[v_i] := v_hash;
  END LOOP;
  -- Ids are drawn in that order: the chain's order. The pending entries
  -- go in the same statement (the guard lets only the seal's delete
  -- through), found by their row addresses (no scan of the table, whose
  -- dead rows autovacuum clears only now and then). The rows are locked by
  -- the head's lock holder alone, so none moved since they were read.
  -- Its generic plan, always (as the read's): under the default plan cache
  -- mode each call was planned anew (a plan for the arrays' actual values
  -- is estimated far cheaper than one for arrays of unknown length, so the
  -- generic plan was never chosen), about 60 us of a one-row transaction's
  -- seal. The generic plan (a TID scan, a hash join on the moved rows, a
  -- sort) is linear in the number of entries however many there are.
  IF v_i > 0 THEN
    PERFORM set_config({{seal_setting}}, 'on', true);
    WITH moved AS (DELETE FROM {{schema}}.{{pending_table}} p WHERE p.ctid = ANY (v_rows) RETURNING p.*),
         sealed AS (
           INSERT INTO {{schema}}.{{audit_table}} ("time", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, prev_hash, hash)
           SELECT m."time", m.actor, m.actor_given, m.request_id, m.operation, m.table_name, m.row_pk, m.changed_columns, u.prev, u.hash
             FROM unnest(v_pids, v_prevs, v_hashes) WITH ORDINALITY AS u(pid, prev, hash, n)
             JOIN moved m ON m.pid = u.pid
            ORDER BY u.n
           RETURNING id)
    SELECT max(id) INTO v_last FROM sealed;
  END IF;
  PERFORM set_config({{seal_setting}}, 'off', true), set_config('enable_seqscan', v_seqscan, true),
          set_config('plan_cache_mode', v_plans, true);
  IF v_i = 0 THEN
    RETURN 0;
  END IF;
  UPDATE {{schema}}.{{head_table}} SET last_id = v_last, hash = v_hash, sealed_at = clock_timestamp(), seal_floor = v_next
   WHERE one;
  PERFORM {{anchor}}(v_last, v_hash);
  RETURN v_i;
END

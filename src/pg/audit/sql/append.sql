
  IF coalesce(cardinality({{pks}}), 0) = 0 THEN
    RETURN{{ret}};
  END IF;
  -- The head row's lock serializes appends per tenant until commit. The
  -- first append of a transaction marks the head with its xid (the update
  -- takes the lock, waiting for the writer before), which queues the
  -- deferred tail trigger on the head: at commit, once per transaction
  -- however many entries it appended, it moves the head to the last entry.
  -- (Updating the head per append would make a long transaction
  -- quadratic.) A later append finds the mark, and the lock, its own. A
  -- REPEATABLE READ writer that raced another fails here (40001) rather
  -- than fork the chain. The head is found by its key (`one`), through its
  -- index: a head updated thousands of times a second leaves dead versions
  -- over many pages, which a scan of the table would read every time.
  UPDATE {{schema}}.{{head_table}} SET xid = txid_current() WHERE one AND xid IS DISTINCT FROM txid_current();
  -- In a statement of its own (a snapshot taken once the lock is held):
  -- the mark is this transaction's, and the chain's last entry.
  SELECT h.xid, (SELECT a.hash FROM {{schema}}.{{audit_table}} a ORDER BY a.id DESC LIMIT 1)
    INTO v_xid, v_hash
    FROM {{schema}}.{{head_table}} h WHERE h.one AND h.xid = txid_current();
  IF NOT FOUND THEN
    RAISE EXCEPTION 'the audit chain head %.{{head_table}} has no row', {{schema_lit}}
      USING ERRCODE = 'no_data_found';
  END IF;
  v_hash := coalesce(v_hash, decode(repeat('00', 32), 'hex'));
  v_time := clock_timestamp();
  v_actor := nullif(current_setting('tenancy.actor', true), '');
  v_given := v_actor IS NOT NULL;
  v_actor := coalesce(v_actor, session_user::text);
  v_request := nullif(current_setting('tenancy.request_id', true), '');
  -- The content's first and last lines are the statement's; only the key
  -- differs per row.
  v_header := convert_to({{header}} || E'\n', 'UTF8');
  v_tail := convert_to(E'\n' || {{tail}}, 'UTF8');
  FOREACH v_pk IN ARRAY {{pks}} LOOP
    v_i := v_i + 1;
    v_prevs[v_i] := v_hash;
    v_hash := sha256(v_hash || v_header || convert_to({{pk}}, 'UTF8') || v_tail);
    v_hashes[v_i] := v_hash;
  END LOOP;
  -- Ids are drawn in unnest's order: the chain's order.
  INSERT INTO {{schema}}.{{audit_table}} ("time", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, prev_hash, hash)
  SELECT v_time, v_actor, v_given, v_request, {{op}}, {{table}}, u.pk, {{changed}}, u.prev, u.hash
    FROM unnest({{pks}}, v_prevs, v_hashes) AS u(pk, prev, hash);

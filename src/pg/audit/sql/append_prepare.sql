
  -- An entry waits in the pending table, unchained, until it is sealed
  -- into the chain at commit (the tail trigger, deferred, queued by the
  -- transaction's first entry: the one marked `seal`), so a tenant's
  -- concurrent writers never wait for one another's commits: no lock here.
  -- The mark that the transaction has its first entry is a setting local
  -- to it, set once an entry is in (a savepoint rolled back takes the mark
  -- and the entry back alike).
  v_time := clock_timestamp();
  v_first := current_setting({{queued}}, true) IS DISTINCT FROM 'on';
  v_queue := v_first;
  IF v_first THEN
    -- With a seal delay (milliseconds, the role's or session's setting),
    -- a transaction that starts within it of the last seal leaves its
    -- entries to a later one: one seal per delay on a busy tenant instead
    -- of one per commit. A value that is not a number counts as 0.
    v_delay := substring(current_setting({{delay_setting}}, true) FROM '^[0-9]{1,7}$')::integer;
    IF v_delay > 0 THEN
      SELECT h.sealed_at > v_time - make_interval(secs => v_delay / 1000.0) INTO v_recent
        FROM {{schema}}.{{head_table}} h WHERE h.one;
      v_queue := v_recent IS NOT TRUE;
    END IF;
  END IF;
  v_actor := nullif(current_setting('tenancy.actor', true), '');
  v_given := v_actor IS NOT NULL;
  v_actor := coalesce(v_actor, session_user::text);
  v_request := nullif(current_setting('tenancy.request_id', true), '');

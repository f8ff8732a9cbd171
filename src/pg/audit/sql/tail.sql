BEGIN
  -- At commit, once per transaction that appended (queued by its first
  -- entry): seal what is pending, its own entries and those of every
  -- transaction committed before, without waiting for a seal under way in
  -- another transaction (whose commit is not waited for either: what it
  -- cannot see, the next commit or the operator's pass seals). Only under
  -- READ COMMITTED, whose statements see the latest commits: a REPEATABLE
  -- READ or SERIALIZABLE writer's snapshot may predate the last seal, so
  -- it leaves its entries to the next one.
  IF current_setting('transaction_isolation') = 'read committed' THEN
    PERFORM {{schema}}.{{seal}}(false);
  END IF;
  RETURN NULL;
END

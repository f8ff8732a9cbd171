
  v_hash bytea;
  v_time timestamptz;
  v_actor text;
  v_given boolean;
  v_request text;
  v_header bytea;
  v_tail bytea;
  v_pk jsonb;
  v_prevs bytea[] := '{}';
  v_hashes bytea[] := '{}';
  v_i integer := 0;
  v_xid bigint;


  v_time timestamptz;
  v_actor text;
  v_given boolean;
  v_request text;
  v_first boolean;
  v_queue boolean;
  v_delay integer;
  v_recent boolean;
  v_i integer := 0;

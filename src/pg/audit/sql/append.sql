
  IF coalesce(cardinality({{pks}}), 0) = 0 THEN
    RETURN{{ret}};
  END IF;
  -- Pending ids are drawn in unnest's order: the statement's order.
  INSERT INTO {{schema}}.{{pending_table}} ("time", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, seal)
  SELECT v_time, v_actor, v_given, v_request, {{op}}, {{table}}, u.pk, {{changed}}, v_queue AND u.n = 1
    FROM unnest({{pks}}) WITH ORDINALITY AS u(pk, n);{{mark}}

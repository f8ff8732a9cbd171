INSERT INTO {{schema}}.{{pending_table}} ("time", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, seal)
                 SELECT v_time, v_actor, v_given, v_request, TG_OP, TG_TABLE_NAME::text,

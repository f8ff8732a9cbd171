
{{indent}}IF v_first THEN
{{indent}}  PERFORM set_config({{queued}}, 'on', true);
{{indent}}END IF;

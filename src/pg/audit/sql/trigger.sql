#variable_conflict use_variable
DECLARE{{append_vars}}
  v_cols text;
  v_keys text[];
  v_all jsonb[];
  v_pks jsonb[] := '{}';
  v_new jsonb;
  v_old jsonb;
  v_changed text[];
  v_diff text;
  v_olds text;
  v_news text;
BEGIN{{prepare}}
  IF TG_OP = 'TRUNCATE' THEN
    v_pks := ARRAY[NULL::jsonb];
  ELSIF TG_LEVEL = 'ROW' THEN
    -- A per-row UPDATE trigger of an earlier version, until the reconcile
    -- replaces it.
    v_new := to_jsonb(NEW);
    v_old := to_jsonb(OLD);
    SELECT coalesce(array_agg(n.key ORDER BY n.key), '{}') INTO v_changed
      FROM jsonb_each(v_new) n WHERE (v_old -> n.key) IS DISTINCT FROM n.value;
    v_pks := ARRAY[jsonb_build_array((
      SELECT jsonb_object_agg(a.attname, v_new -> a.attname::text)
        FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
       WHERE i.indrelid = TG_RELID AND i.indisprimary))];
  ELSE
    -- The primary key's columns. The operator creates the triggers with
    -- the key's index (its oid) and column names as arguments; they are
    -- taken when that index is still the table's replica identity index
    -- (under the default identity: its primary key) and its columns still
    -- carry those names: two look-ups in the relation and system caches.
    -- Otherwise (a key changed since the triggers were made, a table
    -- restored or moved with new oids, no key, an identity other than the
    -- default, triggers made before these arguments) the catalog query,
    -- about ten times the cost per statement. Either way the names are the
    -- primary key's as the catalog has them now.
    IF TG_NARGS > 1 AND pg_get_replica_identity_index(TG_RELID) = TG_ARGV[0]::oid THEN
      v_keys := TG_ARGV[1:TG_NARGS - 1];
      FOR v_i IN 1 .. TG_NARGS - 1 LOOP
        IF pg_get_indexdef(TG_ARGV[0]::oid, v_i, false) IS DISTINCT FROM quote_ident(TG_ARGV[v_i]) THEN
          v_keys := NULL;
          EXIT;
        END IF;
      END LOOP;
    END IF;
    IF v_keys IS NULL THEN
      SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)) INTO v_keys
        FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
       WHERE i.indrelid = TG_RELID AND i.indisprimary;
    END IF;
    -- A statement of fewer than {{small_statement}} rows (the usual application
    -- write): its keys read and its entry appended by one statement, whose
    -- plan is cached for the session; it gives the number of rows it read
    -- (at most {{small_statement}}), so that one of none appends nothing and a larger
    -- one is read below.
    IF TG_OP = 'UPDATE' THEN
      -- The old and new transition tables hold each updated row at the same
      -- position. The keys are the new rows' (as the per-row trigger gave);
      -- the changed columns are those any row of the statement changed,
      -- compared as jsonb values.
      WITH o AS (SELECT to_jsonb(o.*) AS j, row_number() OVER () AS n FROM (SELECT * FROM tenancy_old LIMIT {{small_statement}}) o),
           u AS (SELECT to_jsonb(u.*) AS j, row_number() OVER () AS n FROM (SELECT * FROM tenancy_new LIMIT {{small_statement}}) u),
           p AS (SELECT o.j AS old, u.j AS new, n FROM o JOIN u USING (n)),
           s AS (SELECT (SELECT array_agg((SELECT jsonb_object_agg(k, p.new -> k) FROM unnest(v_keys) k) ORDER BY p.n) FROM p) AS pks,
                        (SELECT coalesce(array_agg(DISTINCT e.key ORDER BY e.key), '{}') FROM p, jsonb_each(p.new) e
                          WHERE (p.old -> e.key) IS DISTINCT FROM e.value) AS changed),
           i AS ({{small_insert}} to_jsonb(s.pks), s.changed, v_queue FROM s WHERE cardinality(s.pks) < {{small_statement}})
      SELECT coalesce(cardinality(s.pks), 0) INTO v_i FROM s;
    ELSIF TG_OP = 'INSERT' THEN
      WITH s AS (SELECT array_agg((SELECT jsonb_object_agg(k, to_jsonb(t.*) -> k) FROM unnest(v_keys) k)) AS pks
                   FROM (SELECT * FROM tenancy_new LIMIT {{small_statement}}) t),
           i AS ({{small_insert}} to_jsonb(s.pks), NULL, v_queue FROM s WHERE cardinality(s.pks) < {{small_statement}})
      SELECT coalesce(cardinality(s.pks), 0) INTO v_i FROM s;
    ELSE
      WITH s AS (SELECT array_agg((SELECT jsonb_object_agg(k, to_jsonb(t.*) -> k) FROM unnest(v_keys) k)) AS pks
                   FROM (SELECT * FROM tenancy_old LIMIT {{small_statement}}) t),
           i AS ({{small_insert}} to_jsonb(s.pks), NULL, v_queue FROM s WHERE cardinality(s.pks) < {{small_statement}})
      SELECT coalesce(cardinality(s.pks), 0) INTO v_i FROM s;
    END IF;
    IF v_i = 0 THEN
      RETURN NULL;
    ELSIF v_i < {{small_statement}} THEN{{mark}}
      RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
      -- Many rows: one query naming the key columns and comparing each
      -- column once per row, planned for this statement (a whole row as
      -- jsonb and a key/value row per column per row cost more than the
      -- plan). The sides' columns are renamed c<attnum>: a table's own
      -- column names appear only qualified (o."x"), so none can be taken
      -- for one of the query's names.
      SELECT string_agg(format('o.%I AS c%s', a.attname, a.attnum), ', ' ORDER BY a.attnum),
             string_agg(format('u.%I AS c%s', a.attname, a.attnum), ', ' ORDER BY a.attnum),
             string_agg(format('CASE WHEN bool_or(pg_catalog.to_jsonb(o.c%s) IS DISTINCT FROM pg_catalog.to_jsonb(u.c%s)) THEN %L::text END',
                               a.attnum, a.attnum, a.attname), ', ' ORDER BY a.attnum)
        INTO v_olds, v_news, v_diff
        FROM pg_attribute a WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped;
      SELECT string_agg(format('%L, u.c%s', a.attname, a.attnum), ', ' ORDER BY array_position(i.indkey::int2[], a.attnum))
        INTO v_cols
        FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
       WHERE i.indrelid = TG_RELID AND i.indisprimary;
      EXECUTE format('SELECT array_agg(%s ORDER BY o.n), ARRAY[%s]::text[]
                        FROM (SELECT row_number() OVER () AS n, %s FROM tenancy_old o) o
                        JOIN (SELECT row_number() OVER () AS n, %s FROM tenancy_new u) u USING (n)',
                     CASE WHEN v_cols IS NULL THEN 'NULL::jsonb' ELSE 'pg_catalog.jsonb_build_object(' || v_cols || ')' END,
                     v_diff, v_olds, v_news)
        INTO v_all, v_changed;
      SELECT coalesce(array_agg(c ORDER BY c), '{}') INTO v_changed FROM unnest(v_changed) c WHERE c IS NOT NULL;
    ELSE
      -- Many rows: a query naming the key columns, planned per statement but
      -- touching only them.
      SELECT string_agg(format('%L, t.%I', k, k), ', ' ORDER BY n) INTO v_cols FROM unnest(v_keys) WITH ORDINALITY AS u(k, n);
      EXECUTE format('SELECT array_agg(%s) FROM %I t',
                     CASE WHEN v_cols IS NULL THEN 'NULL::jsonb' ELSE 'pg_catalog.jsonb_build_object(' || v_cols || ')' END,
                     CASE TG_OP WHEN 'INSERT' THEN 'tenancy_new' ELSE 'tenancy_old' END)
        INTO v_all;
    END IF;
    v_i := 0;
  END IF;
  IF TG_LEVEL = 'STATEMENT' AND TG_OP <> 'TRUNCATE' THEN
    IF coalesce(cardinality(v_all), 0) = 0 THEN
      RETURN NULL;
    END IF;
    -- One entry per {{chunk_rows}} rows of the statement: their keys as a JSON
    -- array (a row without a primary key counts as null), in the transition
    -- table's order. No rows: no entry.
    FOR v_i IN 0 .. (coalesce(cardinality(v_all), 0) - 1) / {{chunk_rows}} LOOP
      v_pks[v_i + 1] := to_jsonb(v_all[v_i * {{chunk_rows}} + 1 : (v_i + 1) * {{chunk_rows}}]);
    END LOOP;
  END IF;{{append}}
  RETURN NULL;
END

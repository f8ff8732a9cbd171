DECLARE{{append_vars}}
BEGIN{{append}}
END

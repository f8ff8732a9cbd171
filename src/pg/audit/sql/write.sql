DECLARE{{append_vars}}
BEGIN{{prepare}}{{append}}
END

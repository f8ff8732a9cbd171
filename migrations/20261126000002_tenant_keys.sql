-- Per-tenant key material: the 32-byte random HKDF salt (destroyed with the
-- row on delete: crypto-shredding) and the root key version the tenant's
-- sealed secrets currently use.
ALTER TABLE tenancy.tenants ADD COLUMN IF NOT EXISTS key_salt bytea CHECK (key_salt IS NULL OR octet_length(key_salt) = 32);
ALTER TABLE tenancy.tenants ADD COLUMN IF NOT EXISTS key_version integer;

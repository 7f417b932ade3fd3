-- Tollgate reads these times into chrono, which has no infinity: reading 'infinity' or '-infinity' panics. An
-- operator's `UPDATE api_keys SET expires_at = 'infinity'` (PostgreSQL's usual "never") stopped every validator's key
-- refresher for good, so that no later revocation reached them. The columns now refuse both, and the constraint's name
-- says what to write instead. Infinities already there become what they meant.
SET LOCAL lock_timeout = '5s';

UPDATE api_keys SET expires_at = CASE WHEN expires_at > 'epoch' THEN NULL ELSE timestamptz 'epoch' END
 WHERE NOT isfinite(expires_at);
UPDATE api_keys SET revoked_at = CASE WHEN revoked_at > 'epoch' THEN now() ELSE timestamptz 'epoch' END
 WHERE NOT isfinite(revoked_at);

ALTER TABLE api_keys
    ADD CONSTRAINT api_keys_expires_at_finite_null_is_never CHECK (isfinite(expires_at)),
    ADD CONSTRAINT api_keys_revoked_at_finite CHECK (isfinite(revoked_at));

COMMENT ON CONSTRAINT api_keys_expires_at_finite_null_is_never ON api_keys IS
    'A key that never expires has expires_at NULL; ''infinity'' cannot be read by Tollgate.';
COMMENT ON CONSTRAINT api_keys_revoked_at_finite ON api_keys IS
    'revoked_at is when the key was revoked, or NULL; an infinity cannot be read by Tollgate.';

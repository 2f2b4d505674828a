-- Join tokens are single-use by default (issue #22): `uses_left` counts the registrations a join
-- token may still make; registration takes one in the transaction that creates the node, and a
-- token at 0 is refused like a revoked one. NULL: unlimited (other roles, and join tokens made
-- before this migration, which keep working as they did). Only join tokens carry a count.
ALTER TABLE api_tokens
    ADD COLUMN uses_left integer CHECK (uses_left IS NULL OR uses_left >= 0),
    ADD CONSTRAINT api_tokens_uses_only_join CHECK (uses_left IS NULL OR role = 'join');

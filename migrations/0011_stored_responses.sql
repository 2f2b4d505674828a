-- Stored OpenAI Responses (`POST /v1/responses` with `store: true`, issue #23). The agent that
-- served a response keeps it in memory and writes it here behind, so `previous_response_id`,
-- `GET` and `DELETE /v1/responses/{id}` work from any node of the fleet. `owner` is a digest of
-- the API key that created it (agents compare it; a different key gets 404); `body` holds the
-- Response object and the conversation items it continues. The leader deletes rows past
-- `expires_at` (`[responses] retention`, default 30 days).
CREATE TABLE stored_responses (
    id text PRIMARY KEY,
    owner text NOT NULL,
    node_id uuid,
    body jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX stored_responses_expires_at ON stored_responses (expires_at);

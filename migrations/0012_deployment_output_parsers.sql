-- How a deployment's tool calls are parsed and its reasoning separated, handed to every agent
-- that runs one of its workers (kvfleet_proto::api::ToolParser, ReasoningParser). 'auto': the
-- node's own [[models]] setting, else what the model's chat template implies. Existing rows
-- get 'auto', which is what they did before.
ALTER TABLE deployments
    ADD COLUMN tool_parser text NOT NULL DEFAULT 'auto'
        CHECK (tool_parser IN ('auto', 'hermes', 'llama3_json', 'mistral', 'pythonic')),
    ADD COLUMN reasoning_parser text NOT NULL DEFAULT 'auto'
        CHECK (reasoning_parser IN ('auto', 'none', 'think', 'deepseek_r1'));

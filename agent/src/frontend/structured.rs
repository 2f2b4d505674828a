//! Structured output: OpenAI's `response_format` and vLLM's `guided_json`, `guided_regex`,
//! `guided_choice`, `guided_grammar` and `structured_outputs`, read into the one
//! [`Constraint`] the worker's sampler follows (`kvfleet_model::grammar`). At most one of them
//! may ask for a constraint; the model's tokenizer compiles it here, so a bad schema is a 400
//! naming the field before the request costs anything.

use kvfleet_proto::Constraint;
use serde_json::Value;

use super::api::ApiError;

/// The fields that can ask for a constraint, in the order they are read.
const SOURCES: &[&str] = &[
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
];

/// The constraint `body` asks for, if any.
pub(super) fn constraint(body: &Value) -> Result<Option<(&'static str, Constraint)>, ApiError> {
    let mut found: Option<(&'static str, Constraint)> = None;
    for &field in SOURCES {
        let Some(value) = body.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(constraint) = read(field, value)? else {
            continue;
        };
        if let Some((first, _)) = &found {
            return Err(ApiError::invalid_value(
                field,
                format!("{first} and {field} both constrain the output: give one of them"),
            ));
        }
        found = Some((field, constraint));
    }
    Ok(found)
}

fn read(field: &'static str, value: &Value) -> Result<Option<Constraint>, ApiError> {
    let bad = |param: &str, what: &str| ApiError::invalid_value(param, what.to_owned());
    match field {
        "response_format" => {
            let kind = value.get("type").and_then(Value::as_str).ok_or_else(|| {
                bad(
                    "response_format.type",
                    "response_format needs a type: \"text\", \"json_object\" or \"json_schema\"",
                )
            })?;
            match kind {
                "text" => Ok(None),
                "json_object" => Ok(Some(any_json_object())),
                "json_schema" => {
                    let schema = value
                        .get("json_schema")
                        .and_then(|s| s.get("schema"))
                        .filter(|s| s.is_object() || s.is_boolean())
                        .ok_or_else(|| {
                            bad(
                                "response_format.json_schema.schema",
                                "a json_schema response format needs json_schema.schema, a \
                                 JSON Schema object",
                            )
                        })?;
                    Ok(Some(Constraint::JsonSchema(schema.to_string())))
                }
                other => Err(bad(
                    "response_format.type",
                    &format!(
                        "response_format type {other:?} is unknown: expected \"text\", \
                         \"json_object\" or \"json_schema\""
                    ),
                )),
            }
        }
        "guided_json" => schema(field, value).map(Some),
        "guided_regex" => string(field, value).map(|r| Some(Constraint::Regex(r))),
        "guided_choice" => choices(field, value).map(Some),
        "guided_grammar" => string(field, value).map(|g| Some(Constraint::Lark(g))),
        "structured_outputs" => {
            let object = value.as_object().ok_or_else(|| {
                bad(
                    field,
                    "structured_outputs must be an object with one of json, regex, choice, \
                     grammar, json_object",
                )
            })?;
            let mut given = object.iter().filter(|(_, v)| !v.is_null());
            let (Some((key, inner)), None) = (given.next(), given.next()) else {
                return Err(bad(
                    field,
                    "structured_outputs needs exactly one of json, regex, choice, grammar, \
                     json_object",
                ));
            };
            let param = format!("structured_outputs.{key}");
            match key.as_str() {
                "json" => schema(&param, inner).map(Some),
                "regex" => string(&param, inner).map(|r| Some(Constraint::Regex(r))),
                "choice" => choices(&param, inner).map(Some),
                "grammar" => string(&param, inner).map(|g| Some(Constraint::Lark(g))),
                "json_object" if inner == &Value::Bool(true) => Ok(Some(any_json_object())),
                "json_object" => Ok(None),
                other => Err(bad(
                    &param,
                    &format!(
                        "structured_outputs.{other} is unknown: expected json, regex, choice, \
                         grammar or json_object"
                    ),
                )),
            }
        }
        _ => Ok(None),
    }
}

fn any_json_object() -> Constraint {
    Constraint::JsonSchema(r#"{"type": "object"}"#.to_owned())
}

/// A JSON Schema given as an object or as JSON text (vLLM takes both).
fn schema(param: &str, value: &Value) -> Result<Constraint, ApiError> {
    let schema = match value {
        Value::String(text) => serde_json::from_str::<Value>(text).map_err(|e| {
            ApiError::invalid_value(param, format!("{param} is not a JSON Schema: {e}"))
        })?,
        other => other.clone(),
    };
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(ApiError::invalid_value(
            param,
            format!("{param} must be a JSON Schema object"),
        ));
    }
    Ok(Constraint::JsonSchema(schema.to_string()))
}

fn string(param: &str, value: &Value) -> Result<String, ApiError> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| ApiError::invalid_value(param, format!("{param} must be a string")))
}

fn choices(param: &str, value: &Value) -> Result<Constraint, ApiError> {
    let list: Option<Vec<String>> = value.as_array().and_then(|items| {
        items
            .iter()
            .map(|c| c.as_str().map(str::to_owned))
            .collect()
    });
    match list {
        Some(list) if !list.is_empty() => Ok(Constraint::Choice(list)),
        _ => Err(ApiError::invalid_value(
            param,
            format!("{param} must be a non-empty list of strings"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One row per way of asking: the body's fields and the constraint read (or the param of
    /// the 400).
    #[test]
    fn every_source_reads_into_one_constraint() {
        let object = Constraint::JsonSchema(r#"{"type": "object"}"#.into());
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let ok: Vec<(Value, Option<Constraint>)> = vec![
            (json!({}), None),
            (json!({"response_format": {"type": "text"}}), None),
            (
                json!({"response_format": {"type": "json_object"}}),
                Some(object.clone()),
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "strict": true, "schema": schema}}}),
                Some(Constraint::JsonSchema(schema.to_string())),
            ),
            (
                json!({"guided_json": schema.to_string()}),
                Some(Constraint::JsonSchema(schema.to_string())),
            ),
            (
                json!({"guided_regex": "[a-z]+"}),
                Some(Constraint::Regex("[a-z]+".into())),
            ),
            (
                json!({"guided_choice": ["a", "b"]}),
                Some(Constraint::Choice(vec!["a".into(), "b".into()])),
            ),
            (
                json!({"guided_grammar": "start: \"x\""}),
                Some(Constraint::Lark("start: \"x\"".into())),
            ),
            (
                json!({"structured_outputs": {"choice": ["y"]}}),
                Some(Constraint::Choice(vec!["y".into()])),
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                Some(object),
            ),
        ];
        for (body, expected) in ok {
            let got = constraint(&body).unwrap().map(|(_, c)| c);
            assert_eq!(got, expected, "{body}");
        }
        let bad: Vec<(Value, &str)> = vec![
            (json!({"response_format": {}}), "response_format.type"),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format.type",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format.json_schema.schema",
            ),
            (json!({"guided_json": "{nope"}), "guided_json"),
            (json!({"guided_regex": 5}), "guided_regex"),
            (json!({"guided_choice": []}), "guided_choice"),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
                "structured_outputs",
            ),
            (
                json!({"guided_regex": "a", "guided_choice": ["b"]}),
                "guided_choice",
            ),
        ];
        for (body, param) in bad {
            let error = constraint(&body).unwrap_err();
            assert_eq!(
                error.param.as_deref(),
                Some(param),
                "{body}: {}",
                error.message
            );
        }
    }
}

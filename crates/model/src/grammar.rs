//! Grammar-constrained decoding (structured output) on `llguidance`, the grammar engine behind
//! llama.cpp's and vLLM's: a request's [`Constraint`] (a JSON Schema, a regular expression, a
//! list of choices or a Lark grammar) becomes a [`Constrained`] matcher that, before each
//! sampled token, masks every token the grammar does not allow at that point and, after it,
//! advances over the token.
//!
//! [`GrammarEngine`] is built once per tokenizer: its token trie comes from our tokenizer's
//! own byte table ([`Tokenizer::token_pieces`]), special tokens named as llguidance expects
//! (`0xFF` + name), so no second tokenizer library is involved. A matcher holds no state that
//! the request does not carry: [`Constrained::catch_up`] replays the output so far, which is how
//! a constrained request survives preemption, a prefill → decode hand-off and migration.

use std::sync::Arc;

use kvfleet_proto::Constraint;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use crate::tokenizer::{TokenPiece, Tokenizer};

/// Why a constraint could not be compiled or followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// The constraint does not compile (a bad schema, regex or grammar); the message says
    /// where.
    #[error("the constraint does not compile: {0}")]
    Invalid(String),
    /// The output left the grammar (a token it does not allow), or the matcher failed.
    #[error("the constrained output failed: {0}")]
    Failed(String),
}

/// The grammar compiler for one tokenizer.
pub struct GrammarEngine {
    factory: Arc<ParserFactory>,
    /// Every end-of-sequence id: allowed wherever the grammar allows its EOS.
    eos_ids: Arc<[u32]>,
    vocab_size: usize,
}

impl std::fmt::Debug for GrammarEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEngine")
            .field("vocab_size", &self.vocab_size)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl GrammarEngine {
    /// Builds the token trie and the parser factory for `tokenizer` (tens of milliseconds for
    /// a 50k vocabulary).
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, GrammarError> {
        let (pieces, _) = tokenizer.token_pieces();
        let words: Vec<Vec<u8>> = pieces
            .into_iter()
            .map(|piece| match piece {
                TokenPiece::Bytes(bytes) => bytes.into_vec(),
                TokenPiece::Special(name) => {
                    let mut word = vec![0xFF];
                    word.extend_from_slice(name.as_bytes());
                    word
                }
            })
            .collect();
        let eos_ids: Arc<[u32]> = tokenizer.eos_ids().into();
        let eos = eos_ids.first().copied().ok_or_else(|| {
            GrammarError::Invalid("the tokenizer has no end-of-sequence token".into())
        })?;
        let vocab_size = words.len();
        let info = TokRxInfo::new(
            u32::try_from(vocab_size).unwrap_or(u32::MAX),
            eos as toktrie::TokenId,
        );
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Invalid(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            eos_ids,
            vocab_size,
        })
    }

    /// A matcher at the start of the output for `constraint`.
    pub fn matcher(&self, constraint: &Constraint) -> Result<Constrained, GrammarError> {
        let grammar = top_level(constraint)?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError::Invalid(error));
        }
        Ok(Constrained {
            matcher,
            consumed: 0,
            eos_ids: self.eos_ids.clone(),
            vocab_size: self.vocab_size,
        })
    }
}

/// llguidance's grammar for a constraint.
fn top_level(constraint: &Constraint) -> Result<TopLevelGrammar, GrammarError> {
    Ok(match constraint {
        Constraint::JsonSchema(text) => {
            let mut schema: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| GrammarError::Invalid(format!("the JSON schema is not JSON: {e}")))?;
            // Fixed whitespace, as `json.dumps` writes it: JSON's optional whitespace is where a
            // small model wanders off (a run of spaces until `max_tokens`). A schema that says
            // otherwise (`x-guidance`, llguidance's options) keeps its own.
            if let Some(object) = schema.as_object_mut()
                && !object.contains_key("x-guidance")
            {
                object.insert(
                    "x-guidance".into(),
                    serde_json::json!({"whitespace_flexible": false,
                        "item_separator": ", ", "key_separator": ": "}),
                );
            }
            TopLevelGrammar::from_json_schema(schema)
        }
        Constraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
        Constraint::Choice(choices) => {
            if choices.is_empty() {
                return Err(GrammarError::Invalid("the list of choices is empty".into()));
            }
            // Lark string literals are JSON strings: each choice exactly, escapes included.
            let literals: Vec<String> = choices
                .iter()
                .map(|c| serde_json::to_string(c).unwrap_or_default())
                .collect();
            TopLevelGrammar::from_lark(format!("start: {}", literals.join(" | ")))
        }
        Constraint::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
    })
}

/// One request's grammar state: where in the grammar its output is.
pub struct Constrained {
    matcher: Matcher,
    /// Output tokens consumed so far.
    consumed: usize,
    eos_ids: Arc<[u32]>,
    vocab_size: usize,
}

impl std::fmt::Debug for Constrained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constrained")
            .field("consumed", &self.consumed)
            .finish()
    }
}

impl Constrained {
    /// Advances over the output tokens not consumed yet (`output` is the whole output so far:
    /// after a preemption, a hand-off or a migration, the part another worker generated is
    /// replayed here). An end-of-sequence token ends the output.
    pub fn catch_up(&mut self, output: impl Iterator<Item = u32>) -> Result<(), GrammarError> {
        for token in output.skip(self.consumed) {
            self.consumed += 1;
            if self.eos_ids.contains(&token) || self.matcher.is_stopped() {
                continue;
            }
            self.matcher
                .consume_token(token as toktrie::TokenId)
                .map_err(|e| GrammarError::Failed(e.to_string()))?;
        }
        Ok(())
    }

    /// Sets the logit of every token the grammar does not allow next to -∞ (end-of-sequence
    /// tokens are allowed exactly where the grammar may end): [`allowed`](Self::allowed), then
    /// [`TokenMask::apply`].
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        self.allowed()?.apply(logits)
    }

    /// The tokens the grammar allows next. Needs no logits, so the executor computes it while
    /// the model's forward pass runs and applies it to the logits afterwards.
    pub fn allowed(&mut self) -> Result<TokenMask, GrammarError> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Failed(e.to_string()))?;
        Ok(TokenMask {
            allowed,
            eos_ids: self.eos_ids.clone(),
            vocab_size: self.vocab_size,
        })
    }

    /// Whether the grammar accepts the output as it is (it may end here).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}

/// The tokens a grammar allows at one point of the output ([`Constrained::allowed`]).
pub struct TokenMask {
    allowed: toktrie::SimpleVob,
    eos_ids: Arc<[u32]>,
    vocab_size: usize,
}

impl std::fmt::Debug for TokenMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMask")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl TokenMask {
    /// Sets the logit of every token not allowed to -∞ (end-of-sequence tokens are allowed
    /// exactly where the grammar may end); an error when nothing is allowed.
    pub fn apply(&self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let eos_allowed = self
            .eos_ids
            .first()
            .is_some_and(|&e| self.allowed.is_allowed(e as toktrie::TokenId));
        let mut any = false;
        for (token, logit) in logits.iter_mut().enumerate().take(self.vocab_size) {
            let allowed = if self.eos_ids.contains(&(token as u32)) {
                eos_allowed
            } else {
                self.allowed.is_allowed(token as toktrie::TokenId)
            };
            if allowed {
                any = true;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        // Logits past the tokenizer's vocabulary (padding rows of the output matrix) never win.
        for logit in logits.iter_mut().skip(self.vocab_size) {
            *logit = f32::NEG_INFINITY;
        }
        if any {
            Ok(())
        } else {
            Err(GrammarError::Failed(
                "the grammar allows no token at this point".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn tiny_tokenizer() -> Tokenizer {
        static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
        let dir = DIR.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("kvfleet-grammar-{}", std::process::id()));
            crate::tiny::write_tiny_llama(&dir, crate::tiny::TinySpec::default(), 3).unwrap();
            dir
        });
        crate::load_text(dir).unwrap().tokenizer
    }

    /// Decodes under `constraint` with random logits (a model that knows nothing): whatever it
    /// would pick, the mask keeps it inside the grammar, and the output ends only where the
    /// grammar may. Returns the text.
    fn decode(
        engine: &GrammarEngine,
        tokenizer: &Tokenizer,
        constraint: &Constraint,
        seed: u64,
    ) -> String {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut grammar = engine.matcher(constraint).unwrap();
        let mut output: Vec<u32> = Vec::new();
        let vocab = tokenizer.vocab_size();
        for _ in 0..400 {
            grammar.catch_up(output.iter().copied()).unwrap();
            let mut logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-4.0..4.0)).collect();
            // A model that would rather end at once, and rather chatter than close brackets.
            for &eos in tokenizer.eos_ids() {
                logits[eos as usize] = 3.9;
            }
            grammar.mask(&mut logits).unwrap();
            let token = crate::sampler::top_k(&logits, 1)[0].0;
            if tokenizer.eos_ids().contains(&token) {
                assert!(grammar.is_accepting(), "EOS only where the grammar may end");
                return tokenizer.decode(&output, true).unwrap();
            }
            output.push(token);
        }
        panic!(
            "no end within 400 tokens: {:?}",
            tokenizer.decode(&output, true)
        );
    }

    #[test]
    fn random_logits_under_a_schema_give_valid_json() {
        let tokenizer = tiny_tokenizer();
        let engine = GrammarEngine::new(&tokenizer).unwrap();
        let schema = r#"{"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
            "required": ["name", "age", "tags"], "additionalProperties": false}"#;
        for seed in 0..5 {
            let text = decode(
                &engine,
                &tokenizer,
                &Constraint::JsonSchema(schema.into()),
                seed,
            );
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
            let object = value.as_object().unwrap();
            assert_eq!(object.len(), 3, "{text}");
            assert!(
                object["name"]
                    .as_str()
                    .is_some_and(|n| n.chars().count() <= 8)
            );
            assert!(object["age"].as_u64().is_some_and(|a| a <= 150), "{text}");
            let tags = object["tags"].as_array().unwrap();
            assert!(tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"));
        }
    }

    #[test]
    fn regex_choice_and_lark_constraints_hold() {
        let tokenizer = tiny_tokenizer();
        let engine = GrammarEngine::new(&tokenizer).unwrap();
        for seed in 0..5 {
            let text = decode(
                &engine,
                &tokenizer,
                &Constraint::Regex("[0-9]{3}-[a-z]{2}".into()),
                seed,
            );
            assert!(
                text.len() == 6
                    && text[..3].bytes().all(|b| b.is_ascii_digit())
                    && &text[3..4] == "-"
                    && text[4..].bytes().all(|b| b.is_ascii_lowercase()),
                "{text:?}"
            );
            let choices = vec!["yes".to_owned(), "no \"way\"".to_owned()];
            let text = decode(
                &engine,
                &tokenizer,
                &Constraint::Choice(choices.clone()),
                seed,
            );
            assert!(choices.contains(&text), "{text:?}");
            let text = decode(
                &engine,
                &tokenizer,
                &Constraint::Lark(r#"start: "(" ("x" | "y")+ ")""#.into()),
                seed,
            );
            assert!(
                text.starts_with('(') && text.ends_with(')') && text.len() > 2,
                "{text:?}"
            );
        }
    }

    /// A matcher rebuilt from the output so far (a hand-off or migration) masks the same as
    /// the one that followed it token by token.
    #[test]
    fn a_matcher_caught_up_from_the_output_masks_like_the_original() {
        let tokenizer = tiny_tokenizer();
        let engine = GrammarEngine::new(&tokenizer).unwrap();
        let constraint = Constraint::JsonSchema(r#"{"type": "object"}"#.into());
        let output = tokenizer.encode(r#"{"k": [1, "#, false).unwrap();
        let mut stepwise = engine.matcher(&constraint).unwrap();
        for i in 0..=output.len() {
            stepwise.catch_up(output[..i].iter().copied()).unwrap();
        }
        let mut rebuilt = engine.matcher(&constraint).unwrap();
        rebuilt.catch_up(output.iter().copied()).unwrap();
        let vocab = tokenizer.vocab_size();
        let (mut a, mut b) = (vec![0.0; vocab], vec![0.0; vocab]);
        stepwise.mask(&mut a).unwrap();
        rebuilt.mask(&mut b).unwrap();
        assert_eq!(a, b);
        assert!(a.iter().any(|l| l.is_finite()) && a.iter().any(|l| !l.is_finite()));
    }

    #[test]
    fn bad_constraints_are_refused_with_the_reason() {
        let tokenizer = tiny_tokenizer();
        let engine = GrammarEngine::new(&tokenizer).unwrap();
        for bad in [
            Constraint::JsonSchema("{not json".into()),
            Constraint::JsonSchema(r#"{"type": "frobnicate"}"#.into()),
            Constraint::Regex("(unclosed".into()),
            Constraint::Choice(Vec::new()),
            Constraint::Lark("start: undefined_rule".into()),
        ] {
            let error = engine.matcher(&bad).unwrap_err();
            assert!(
                matches!(error, GrammarError::Invalid(_)),
                "{bad:?}: {error}"
            );
        }
    }
}

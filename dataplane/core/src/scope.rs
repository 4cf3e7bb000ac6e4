//! Scope: everything besides the last prompt that changes an LLM's answer.
//!
//! Two requests may share a cached answer only when their scopes are equal, so the scope is
//! normalised (stable key order, sorted stop sequences, rounded sampling parameters) and hashed
//! into a fingerprint that partitions both the exact and the semantic search.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::vector::short_hash;

/// The request context a cached answer is valid for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scope {
    /// The LLM that produced (or would produce) the answer, e.g. `gpt-4o-mini`.
    pub model: Option<String>,
    /// A free-form partition inside the tenant (an application, a prompt template version).
    pub namespace: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u64>,
    /// Stop sequences; their order does not matter.
    pub stop: Vec<String>,
    /// Tool definitions as the LLM API takes them.
    pub tools: Vec<Value>,
    pub response_format: Option<Value>,
    /// The system prompt.
    pub system: Option<String>,
    /// Earlier turns of the conversation (`{"role","content"}` objects), oldest first.
    pub messages: Vec<Value>,
    /// Any other generation parameter, by its API name (`seed`, `tool_choice`,
    /// `frequency_penalty`, ...). The gateway puts every request field it does not know to be
    /// harmless here, so an unknown parameter separates answers rather than sharing them.
    pub params: BTreeMap<String, Value>,
}

/// The hex fingerprint of a normalised scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScopeFingerprint(pub String);

impl Scope {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }

    /// Hash of the normalised scope. serde_json's map keeps keys sorted, so the encoding is
    /// canonical for equal inputs.
    pub fn fingerprint(&self) -> ScopeFingerprint {
        let mut stop = self.stop.clone();
        stop.sort();
        stop.dedup();
        let mut canonical = serde_json::json!({
            "model": self.model.as_deref().map(str::trim),
            "namespace": self.namespace(),
            // Round sampling parameters so 0.7 and 0.70000001 share a scope.
            "temperature": self.temperature.map(|t| format!("{t:.3}")),
            "top_p": self.top_p.map(|t| format!("{t:.3}")),
            "max_tokens": self.max_tokens,
            "stop": stop,
            "tools": canonicalize(&Value::Array(self.tools.clone())),
            "response_format": self.response_format.as_ref().map(canonicalize),
            "system": self.system.as_deref().map(normalize_prompt),
            "messages": canonicalize(&Value::Array(self.messages.clone())),
        });
        // Only when set, so scopes without parameters keep the fingerprints they always had.
        if !self.params.is_empty()
            && let Value::Object(map) = &mut canonical
        {
            let params: serde_json::Map<String, Value> = self
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            map.insert("params".to_owned(), Value::Object(params));
        }
        ScopeFingerprint(short_hash(canonicalize(&canonical).to_string().as_bytes()))
    }
}

/// Re-encode a JSON value so object keys are sorted at every depth. (serde_json may be built
/// with `preserve_order` by another dependency, so sort explicitly.)
fn canonicalize(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> =
                map.iter().map(|(k, v)| (k, canonicalize(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonicalize).collect()),
        other => other.clone(),
    }
}

/// The prompt as the exact path compares it: trimmed, runs of white space folded to one space.
/// Case is kept: in code and names it changes the answer.
pub fn normalize_prompt(prompt: &str) -> String {
    prompt.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The exact-match key: (scope fingerprint, normalised prompt). The tenant is not hashed in: it
/// partitions by table and key prefix instead.
pub fn exact_key(scope: &ScopeFingerprint, normalized_prompt: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(scope.0.as_bytes());
    hasher.update([0u8]);
    hasher.update(normalized_prompt.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equal_scopes_share_a_fingerprint_regardless_of_key_and_stop_order() {
        let a: Scope = serde_json::from_value(json!({
            "model": "gpt-4o", "temperature": 0.7, "stop": ["b", "a"],
            "response_format": {"type": "json_schema", "schema": {"x": 1, "a": 2}}
        }))
        .expect("scope a");
        let b: Scope = serde_json::from_value(json!({
            "response_format": {"schema": {"a": 2, "x": 1}, "type": "json_schema"},
            "stop": ["a", "b"], "temperature": 0.7000000001, "model": "gpt-4o"
        }))
        .expect("scope b");
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn every_generation_parameter_changes_the_fingerprint() {
        let base = Scope {
            model: Some("m".into()),
            ..Default::default()
        };
        let variants = [
            Scope {
                model: Some("other".into()),
                ..base.clone()
            },
            Scope {
                namespace: Some("ns".into()),
                ..base.clone()
            },
            Scope {
                temperature: Some(0.2),
                ..base.clone()
            },
            Scope {
                top_p: Some(0.5),
                ..base.clone()
            },
            Scope {
                max_tokens: Some(10),
                ..base.clone()
            },
            Scope {
                stop: vec!["x".into()],
                ..base.clone()
            },
            Scope {
                tools: vec![json!({"type": "function"})],
                ..base.clone()
            },
            Scope {
                response_format: Some(json!({"type": "json_object"})),
                ..base.clone()
            },
            Scope {
                system: Some("be brief".into()),
                ..base.clone()
            },
            Scope {
                messages: vec![json!({"role": "user", "content": "hi"})],
                ..base.clone()
            },
        ];
        let fp = base.fingerprint();
        for v in variants {
            assert_ne!(v.fingerprint(), fp, "{v:?}");
        }
    }

    #[test]
    fn prompt_normalisation_folds_white_space_but_keeps_case() {
        assert_eq!(normalize_prompt("  What is\n\tRust?  "), "What is Rust?");
        assert_ne!(normalize_prompt("Rust"), normalize_prompt("rust"));
    }
}

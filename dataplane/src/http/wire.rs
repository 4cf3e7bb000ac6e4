//! The wire forms of the domain's types: what the API accepts and answers, with their OpenAPI
//! schemas. The domain (`semantis-cache`) knows neither JSON field docs nor utoipa; each type
//! here converts into or from its domain counterpart, field for field.

use semantis_cache::HitPath;
use semantis_cache::TenantStats;
use semantis_cache::ports::{DayUsage, ModelUsage};
use semantis_cache::scope::Scope;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// The request context a cached answer is valid for.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
#[schema(as = Scope)]
pub struct ScopeBody {
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
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<Value>,
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// The system prompt.
    pub system: Option<String>,
    /// Earlier turns of the conversation (`{"role","content"}` objects), oldest first.
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    /// Any other generation parameter by its API name (`seed`, `tool_choice`, ...); the
    /// gateway derives these from a chat request's body.
    #[schema(value_type = Object)]
    pub params: std::collections::BTreeMap<String, Value>,
}

impl From<ScopeBody> for Scope {
    fn from(b: ScopeBody) -> Self {
        Self {
            model: b.model,
            namespace: b.namespace,
            temperature: b.temperature,
            top_p: b.top_p,
            max_tokens: b.max_tokens,
            stop: b.stop,
            tools: b.tools,
            response_format: b.response_format,
            system: b.system,
            messages: b.messages,
            params: b.params,
        }
    }
}

/// Which path answered a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = HitPath)]
pub enum HitPathBody {
    Exact,
    Semantic,
}

impl From<HitPath> for HitPathBody {
    fn from(p: HitPath) -> Self {
        match p {
            HitPath::Exact => Self::Exact,
            HitPath::Semantic => Self::Semantic,
        }
    }
}

/// Usage totals for one tenant and model.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = ModelUsage)]
pub struct ModelUsageBody {
    pub model: String,
    pub lookups: u64,
    pub hits: u64,
    pub tokens_saved: u64,
    pub usd_saved: f64,
    /// Gateway calls that went to the upstream.
    pub upstream_calls: u64,
    pub tokens_used: u64,
    /// What those calls cost, from the upstream's price table.
    pub usd_spent: f64,
}

impl From<ModelUsage> for ModelUsageBody {
    fn from(u: ModelUsage) -> Self {
        Self {
            model: u.model,
            lookups: u.lookups,
            hits: u.hits,
            tokens_saved: u.tokens_saved,
            usd_saved: u.usd_saved,
            upstream_calls: u.upstream_calls,
            tokens_used: u.tokens_used,
            usd_spent: u.usd_spent,
        }
    }
}

/// Usage totals for one tenant and UTC day, every model together.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = DayUsage)]
pub struct DayUsageBody {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub lookups: u64,
    pub hits: u64,
    pub tokens_saved: u64,
    pub usd_saved: f64,
    pub upstream_calls: u64,
    pub tokens_used: u64,
    pub usd_spent: f64,
}

impl From<DayUsage> for DayUsageBody {
    fn from(u: DayUsage) -> Self {
        Self {
            day: u.day,
            lookups: u.lookups,
            hits: u.hits,
            tokens_saved: u.tokens_saved,
            usd_saved: u.usd_saved,
            upstream_calls: u.upstream_calls,
            tokens_used: u.tokens_used,
            usd_spent: u.usd_spent,
        }
    }
}

/// A tenant's entries, usage and savings.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = TenantStats)]
pub struct StatsBody {
    pub tenant: String,
    /// Live (unexpired) entries.
    pub entries: u64,
    pub max_entries: u64,
    /// What the tenant's entries cost its byte budget (prompts, responses, metadata, vectors
    /// and 512 bytes each), and the budget (`max_bytes`).
    pub bytes: u64,
    pub max_bytes: u64,
    pub eviction: String,
    pub min_similarity: f32,
    pub index_version: String,
    /// Whether the tenant's LanceDB table has its ANN (IVF-PQ) index (searched while the
    /// resident index is not).
    pub vector_index: bool,
    /// Whether lookups are answered from the in-memory resident index (false while it loads
    /// after a restart, or when `storage.resident_index` is off).
    pub resident_index: bool,
    pub lookups: u64,
    pub hits: u64,
    pub hit_ratio: f64,
    pub tokens_saved: u64,
    pub usd_saved: f64,
    /// The same figures per model.
    pub by_model: Vec<ModelUsageBody>,
    /// Gateway calls that went to the upstream, the tokens they used and what they cost
    /// (beside `tokens_saved` and `usd_saved`: what the cache spared).
    pub upstream_calls: u64,
    pub tokens_used: u64,
    pub usd_spent: f64,
    /// Spend and savings per UTC day, the last 30 days, oldest first.
    pub by_day: Vec<DayUsageBody>,
    /// The verifier semantic hits must pass (absent: cosine similarity alone decides).
    pub verifier: Option<String>,
    /// The verifier score a candidate needs now (feedback toward a target error rate may have
    /// raised it).
    pub verifier_min_score: Option<f32>,
    /// Verdicts users gave on served hits (`POST /v1/feedback`).
    pub feedback: FeedbackCountsBody,
}

/// Verdicts on served hits.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = FeedbackCounts)]
pub struct FeedbackCountsBody {
    pub right: u64,
    pub wrong: u64,
}

impl From<TenantStats> for StatsBody {
    fn from(s: TenantStats) -> Self {
        Self {
            tenant: s.tenant,
            entries: s.entries,
            max_entries: s.max_entries,
            bytes: s.bytes,
            max_bytes: s.max_bytes,
            eviction: s.eviction,
            min_similarity: s.min_similarity,
            index_version: s.index_version,
            vector_index: s.vector_index,
            resident_index: s.resident_index,
            lookups: s.lookups,
            hits: s.hits,
            hit_ratio: s.hit_ratio,
            tokens_saved: s.tokens_saved,
            usd_saved: s.usd_saved,
            by_model: s.by_model.into_iter().map(Into::into).collect(),
            upstream_calls: s.upstream_calls,
            tokens_used: s.tokens_used,
            usd_spent: s.usd_spent,
            by_day: s.by_day.into_iter().map(Into::into).collect(),
            verifier: s.verifier,
            verifier_min_score: s.verifier_min_score,
            feedback: FeedbackCountsBody {
                right: s.feedback.right,
                wrong: s.feedback.wrong,
            },
        }
    }
}

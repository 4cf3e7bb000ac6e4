//! Rate limits and budgets: requests and tokens per minute, dollars per UTC day, per tenant and
//! per end user, in fixed windows. Redis holds the windows in cluster mode (one script checks
//! every window of a request and counts it, so replicas share them exactly); the process
//! holds them in the embedded default. A Redis that fails or is slow lets requests through
//! (fail open) and counts `semantis_gateway_ratelimit_fail_open_total`: a cache must not turn
//! a Redis outage into an LLM outage.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::IntCounterVec;
use semantis_cache::tenants::Tenant;
use semantis_contract::Limit;
use sha2::Digest;

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;
/// How long a limit check may wait for Redis before the request goes through unchecked.
const REDIS_DEADLINE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
    Usd,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Usd => "usd",
        }
    }
}

/// One window a request is held to.
#[derive(Debug, Clone)]
pub struct Window {
    pub key: String,
    pub kind: Kind,
    pub limit: f64,
    /// `tenant` or `user`.
    pub who: &'static str,
    /// When the window ends, in milliseconds since the epoch.
    pub reset_at_ms: i64,
}

/// The windows of one request.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub windows: Vec<Window>,
}

/// What the limits say about a request.
#[derive(Debug, Clone)]
pub enum Admission {
    /// Through; the state of its tightest request window for the `X-RateLimit-*` headers.
    Allowed(Option<RateState>),
    /// Over a limit.
    Refused {
        state: RateState,
        kind: Kind,
        who: &'static str,
    },
}

/// `X-RateLimit-Limit`, `-Remaining`, `-Reset` (seconds), and `Retry-After` when refused.
#[derive(Debug, Clone, Copy)]
pub struct RateState {
    pub limit: f64,
    pub remaining: f64,
    pub reset_secs: u64,
}

pub struct Limits {
    redis: Option<redis::aio::ConnectionManager>,
    local: Mutex<Local>,
    fail_open: IntCounterVec,
    limited: IntCounterVec,
}

#[derive(Default)]
struct Local {
    /// key → (value, window end).
    windows: HashMap<String, (f64, i64)>,
    ops: u64,
}

/// Checks every window (requests: one more must fit; tokens and dollars: not yet spent) and,
/// when all pass, counts the request in its request windows. Returns {0, values...} or
/// {index of the first refusing window, its value}.
const ADMIT_SCRIPT: &str = r"
local n = #KEYS
local values = {}
for i = 1, n do
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit = tonumber(ARGV[(i - 1) * 3 + 1])
  local requests = ARGV[(i - 1) * 3 + 2] == '1'
  if (requests and cur + 1 > limit) or ((not requests) and cur >= limit) then
    return {i, tostring(cur)}
  end
  values[i] = cur
end
for i = 1, n do
  if ARGV[(i - 1) * 3 + 2] == '1' then
    values[i] = redis.call('INCR', KEYS[i])
    redis.call('PEXPIRE', KEYS[i], ARGV[(i - 1) * 3 + 3])
  end
end
local out = {0}
for i = 1, n do out[#out + 1] = tostring(values[i]) end
return out
";

fn user_tag(user: &str) -> String {
    hex::encode(&sha2::Sha256::digest(user.as_bytes())[..8])
}

impl Limits {
    pub fn new(
        redis: Option<redis::aio::ConnectionManager>,
        fail_open: IntCounterVec,
        limited: IntCounterVec,
    ) -> Self {
        Self {
            redis,
            local: Mutex::new(Local::default()),
            fail_open,
            limited,
        }
    }

    /// The windows a request of `tenant` by `user` is held to, at `now_ms`.
    pub fn plan(tenant: &Tenant, user: Option<&str>, now_ms: i64) -> Plan {
        let mut windows = Vec::new();
        let mut add = |who: &'static str, tag: &str, l: &Limit| {
            let minute = now_ms.div_euclid(MINUTE_MS);
            let day = now_ms.div_euclid(DAY_MS);
            let key = |kind: Kind, window: i64| {
                format!(
                    "semantis:{{{}}}:rl:{who}:{tag}:{}:{window}",
                    tenant.name,
                    kind.as_str()
                )
            };
            #[allow(clippy::cast_precision_loss)] // limits far below 2^53
            let mut push = |kind, limit: f64, window, end| {
                windows.push(Window {
                    key: key(kind, window),
                    kind,
                    limit,
                    who,
                    reset_at_ms: end,
                });
            };
            if let Some(r) = l.requests_per_minute {
                push(Kind::Requests, r as f64, minute, (minute + 1) * MINUTE_MS);
            }
            if let Some(t) = l.tokens_per_minute {
                push(Kind::Tokens, t as f64, minute, (minute + 1) * MINUTE_MS);
            }
            if let Some(d) = l.usd_per_day {
                push(Kind::Usd, d, day, (day + 1) * DAY_MS);
            }
        };
        add("tenant", "all", &tenant.limits.tenant);
        if let Some(u) = user.filter(|u| !u.is_empty()) {
            add("user", &user_tag(u), &tenant.limits.user);
        }
        Plan { windows }
    }

    /// Check a request against its windows and count it.
    pub async fn admit(&self, tenant: &str, plan: &Plan, now_ms: i64) -> Admission {
        if plan.windows.is_empty() {
            return Admission::Allowed(None);
        }
        let values = match &self.redis {
            None => Ok(self.admit_local(plan, now_ms)),
            Some(conn) => {
                let script = redis::Script::new(ADMIT_SCRIPT);
                let mut script = script.prepare_invoke();
                for w in &plan.windows {
                    let ttl = (w.reset_at_ms - now_ms).max(1) + MINUTE_MS;
                    script
                        .key(&w.key)
                        .arg(w.limit)
                        .arg(if w.kind == Kind::Requests { "1" } else { "0" })
                        .arg(ttl);
                }
                let mut conn = conn.clone();
                match tokio::time::timeout(
                    REDIS_DEADLINE,
                    script.invoke_async::<Vec<String>>(&mut conn),
                )
                .await
                {
                    Ok(Ok(reply)) => Ok(parse_reply(&reply)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {REDIS_DEADLINE:?}")),
                }
            }
        };
        let outcome = match values {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(tenant, error = %e, "failed to check rate limits in Redis; letting the request through");
                self.fail_open.with_label_values(&[tenant]).inc();
                return Admission::Allowed(None);
            }
        };
        match outcome {
            Outcome::Refused(i, value) => {
                let Some(w) = plan.windows.get(i) else {
                    return Admission::Allowed(None);
                };
                self.limited
                    .with_label_values(&[tenant, w.who, w.kind.as_str()])
                    .inc();
                Admission::Refused {
                    state: state_of(w, value, now_ms),
                    kind: w.kind,
                    who: w.who,
                }
            }
            Outcome::Counted(values) => {
                // The request window with the least room left names the headers.
                let tightest = plan
                    .windows
                    .iter()
                    .zip(values)
                    .filter(|(w, _)| w.kind == Kind::Requests)
                    .map(|(w, v)| state_of(w, v, now_ms))
                    .min_by(|a, b| a.remaining.total_cmp(&b.remaining));
                Admission::Allowed(tightest)
            }
        }
    }

    /// Count what a call used against its token and dollar windows.
    pub async fn charge(&self, tenant: &str, plan: &Plan, tokens: u64, usd: f64, now_ms: i64) {
        let windows: Vec<&Window> = plan
            .windows
            .iter()
            .filter(|w| w.kind != Kind::Requests)
            .collect();
        if windows.is_empty() || (tokens == 0 && usd <= 0.0) {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        let amount = |w: &Window| match w.kind {
            Kind::Tokens => tokens as f64,
            _ => usd,
        };
        match &self.redis {
            None => {
                let mut local = self.local.lock();
                for w in windows {
                    let e = local
                        .windows
                        .entry(w.key.clone())
                        .or_insert((0.0, w.reset_at_ms));
                    e.0 += amount(w);
                }
            }
            Some(conn) => {
                let mut pipe = redis::pipe();
                for w in windows {
                    match w.kind {
                        Kind::Tokens => pipe.incr(&w.key, tokens).ignore(),
                        _ => pipe.incr(&w.key, usd).ignore(),
                    };
                    let ttl = (w.reset_at_ms - now_ms).max(1) + MINUTE_MS;
                    pipe.pexpire(&w.key, ttl).ignore();
                }
                let mut conn = conn.clone();
                let done =
                    tokio::time::timeout(REDIS_DEADLINE, pipe.query_async::<()>(&mut conn)).await;
                if !matches!(done, Ok(Ok(()))) {
                    tracing::warn!(tenant, "failed to count usage against budgets in Redis");
                    self.fail_open.with_label_values(&[tenant]).inc();
                }
            }
        }
    }

    fn admit_local(&self, plan: &Plan, now_ms: i64) -> Outcome {
        let mut local = self.local.lock();
        local.ops += 1;
        if local.ops.is_multiple_of(4096) {
            local.windows.retain(|_, (_, end)| *end > now_ms);
        }
        let current = |l: &Local, w: &Window| {
            l.windows
                .get(&w.key)
                .filter(|(_, end)| *end > now_ms)
                .map_or(0.0, |(v, _)| *v)
        };
        for (i, w) in plan.windows.iter().enumerate() {
            let cur = current(&local, w);
            let over = match w.kind {
                Kind::Requests => cur + 1.0 > w.limit,
                _ => cur >= w.limit,
            };
            if over {
                return Outcome::Refused(i, cur);
            }
        }
        let mut values = Vec::with_capacity(plan.windows.len());
        for w in &plan.windows {
            let cur = current(&local, w);
            if w.kind == Kind::Requests {
                local
                    .windows
                    .insert(w.key.clone(), (cur + 1.0, w.reset_at_ms));
                values.push(cur + 1.0);
            } else {
                values.push(cur);
            }
        }
        Outcome::Counted(values)
    }
}

enum Outcome {
    /// Window index, its value.
    Refused(usize, f64),
    Counted(Vec<f64>),
}

fn parse_reply(reply: &[String]) -> Outcome {
    let num = |s: Option<&String>| s.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    match reply.first().and_then(|s| s.parse::<usize>().ok()) {
        Some(i) if i > 0 => Outcome::Refused(i - 1, num(reply.get(1))),
        _ => Outcome::Counted(reply.iter().skip(1).map(|v| num(Some(v))).collect()),
    }
}

fn state_of(w: &Window, value: f64, now_ms: i64) -> RateState {
    let ms = (w.reset_at_ms - now_ms).max(0);
    RateState {
        limit: w.limit,
        remaining: (w.limit - value).max(0.0),
        reset_secs: u64::try_from((ms + 999) / 1000).unwrap_or(0).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use semantis_contract::{DataplaneConfig, LimitsConfig, TenantConfig};

    fn tenant(limits: LimitsConfig) -> Tenant {
        let cfg = DataplaneConfig {
            tenants: vec![TenantConfig {
                name: "t".into(),
                limits,
                ..Default::default()
            }],
            ..Default::default()
        };
        let reg = semantis_cache::tenants::TenantRegistry::from_config(&cfg).expect("tenant");
        reg.get("t").expect("t").as_ref().clone()
    }

    fn limits() -> Limits {
        let c = |n: &str| IntCounterVec::new(prometheus::Opts::new(n, "h"), &["tenant"]);
        Limits::new(
            None,
            c("a").expect("counter"),
            IntCounterVec::new(prometheus::Opts::new("b", "h"), &["tenant", "who", "kind"])
                .expect("counter"),
        )
    }

    #[tokio::test]
    async fn requests_are_refused_past_the_limit_until_the_next_minute() {
        let t = tenant(LimitsConfig {
            tenant: Limit {
                requests_per_minute: Some(3),
                ..Limit::default()
            },
            ..LimitsConfig::default()
        });
        let l = limits();
        let now = 10 * MINUTE_MS + 15_000;
        for _ in 0..3 {
            let plan = Limits::plan(&t, None, now);
            assert!(matches!(
                l.admit("t", &plan, now).await,
                Admission::Allowed(Some(_))
            ));
        }
        let plan = Limits::plan(&t, None, now);
        let Admission::Refused { state, kind, .. } = l.admit("t", &plan, now).await else {
            panic!("the fourth request in a minute is refused");
        };
        assert_eq!(
            (kind, state.reset_secs, state.remaining),
            (Kind::Requests, 45, 0.0)
        );
        let later = 11 * MINUTE_MS;
        let plan = Limits::plan(&t, None, later);
        assert!(matches!(
            l.admit("t", &plan, later).await,
            Admission::Allowed(_)
        ));
    }

    #[tokio::test]
    async fn budgets_refuse_once_spent_and_users_are_held_apart() {
        let t = tenant(LimitsConfig {
            user: Limit {
                usd_per_day: Some(0.01),
                tokens_per_minute: Some(100),
                ..Limit::default()
            },
            ..LimitsConfig::default()
        });
        let l = limits();
        let now = 3 * DAY_MS + 1000;
        let alice = Limits::plan(&t, Some("alice"), now);
        assert!(matches!(
            l.admit("t", &alice, now).await,
            Admission::Allowed(_)
        ));
        l.charge("t", &alice, 10, 0.02, now).await;
        assert!(matches!(
            l.admit("t", &alice, now).await,
            Admission::Refused {
                kind: Kind::Usd,
                who: "user",
                ..
            }
        ));
        let bob = Limits::plan(&t, Some("bob"), now);
        assert!(matches!(
            l.admit("t", &bob, now).await,
            Admission::Allowed(_)
        ));
        assert!(
            Limits::plan(&t, None, now).windows.is_empty(),
            "no user: no user windows"
        );
    }
}

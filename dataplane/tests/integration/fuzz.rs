//! Property test of the HTTP surface: random methods, routes, headers, bodies and sizes, sent
//! to the real server, never produce a 5xx, a panic or an error outside the error-code table,
//! and the server keeps answering.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

use crate::harness::{ADMIN, KEY_A, KEY_B, Server, Setup};

/// Field names the API knows, so random bodies reach the handlers' checks and not only the
/// JSON parser.
const FIELDS: &[&str] = &[
    "prompt",
    "vector",
    "scope",
    "model",
    "namespace",
    "params",
    "min_similarity",
    "response",
    "ttl_seconds",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "metadata",
    "all",
    "request_id",
    "entry_id",
    "correct",
    "messages",
    "role",
    "content",
    "temperature",
    "stream",
    "n",
    "input",
    "max_tokens",
    "stop",
];

const ROUTES: &[&str] = &[
    "/v1/lookup",
    "/v1/entries",
    "/v1/entries/0190f1b1-0000-7000-8000-000000000000",
    "/v1/entries/NOT-A-UUID",
    "/v1/invalidate",
    "/v1/feedback",
    "/v1/stats",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/embeddings",
    "/readyz",
    "/healthz",
    "/openapi.json",
    "/v1/%ZZ",
    "/nope",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Huge, tiny, negative and fractional numbers; JSON has no NaN or infinity.
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        // Long strings: prompts near and past the body limit.
        (0usize..100_000).prop_map(|n| Value::String("x".repeat(n))),
        prop::collection::vec(-2.0f32..2.0, 0..12).prop_map(|v| json!(v)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..6).prop_map(|fields| {
                Value::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<String, Value>>(),
                )
            }),
        ]
    })
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Json(Value),
    Bytes(Vec<u8>),
}

fn object() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), value()), 0..6).prop_map(|fields| {
        Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<Map<String, Value>>(),
        )
    })
}

/// Bodies of the right shape with random values: these pass the parser and reach the domain's
/// checks (dimensions, ranges, TTLs, empty prompts, huge numbers).
fn shaped() -> impl Strategy<Value = Value> {
    let prompt = prop_oneof![
        ".{0,60}",
        Just("  ".to_owned()),
        Just("what is 17 times 23".to_owned())
    ];
    let number = prop_oneof![
        3 => (1u64..100_000).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
    ];
    let vector = prop_oneof![
        prop::collection::vec(-1.0f32..1.0, 380..390).prop_map(|v| json!(v)),
        Just(json!(vec![0.0f32; 384])),
        Just(json!(vec![1e39f64; 384])),
    ];
    (
        prompt,
        number.clone(),
        number,
        prop::option::of(vector),
        leaf(),
    )
        .prop_map(|(prompt, n1, n2, vector, response)| {
            let mut body = json!({
                "prompt": prompt,
                "response": response,
                "ttl_seconds": n1,
                "prompt_tokens": n2,
                "scope": {"model": "gpt-4o", "namespace": "fuzz"},
            });
            if let Some(v) = vector {
                body["vector"] = v;
            }
            body
        })
}

/// Mostly objects with the API's field names: those reach the handlers.
fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        1 => Just(Body::None),
        4 => shaped().prop_map(Body::Json),
        3 => shaped().prop_map(|mut v| {
            // The same with one field the route may not take.
            if let Some(o) = v.as_object_mut() {
                o.remove("response");
                o.remove("ttl_seconds");
                o.remove("prompt_tokens");
            }
            Body::Json(v)
        }),
        6 => object().prop_map(Body::Json),
        2 => value().prop_map(Body::Json),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Body::Bytes),
    ]
}

/// The routes with their methods, and wrong pairs now and then.
fn target() -> impl Strategy<Value = (reqwest::Method, &'static str)> {
    use reqwest::Method;
    let right: Vec<(Method, &'static str)> = vec![
        (Method::POST, "/v1/lookup"),
        (Method::POST, "/v1/lookup"),
        (Method::POST, "/v1/entries"),
        (Method::POST, "/v1/entries"),
        (
            Method::DELETE,
            "/v1/entries/0190f1b1-0000-7000-8000-000000000000",
        ),
        (Method::DELETE, "/v1/entries/NOT-A-UUID"),
        (Method::POST, "/v1/invalidate"),
        (Method::POST, "/v1/feedback"),
        (Method::GET, "/v1/stats"),
        (Method::POST, "/v1/chat/completions"),
        (Method::GET, "/v1/models"),
        (Method::POST, "/v1/embeddings"),
    ];
    prop_oneof![
        8 => prop::sample::select(right),
        2 => (
            prop::sample::select(vec![
                Method::GET,
                Method::POST,
                Method::DELETE,
                Method::PUT,
            ]),
            prop::sample::select(ROUTES),
        ),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    method: reqwest::Method,
    route: &'static str,
    key: Option<&'static str>,
    tenant: Option<String>,
    content_type: Option<&'static str>,
    extra_headers: Vec<(&'static str, String)>,
    body: Body,
}

fn case() -> impl Strategy<Value = Case> {
    (
        target(),
        prop_oneof![
            6 => Just(Some(KEY_A)),
            1 => Just(Some(ADMIN)),
            1 => prop::option::of(prop::sample::select(vec![KEY_B, "wrong-key", ""])),
        ],
        prop_oneof![
            6 => Just(None),
            1 => Just(Some("team-a".to_owned())),
            1 => Just(Some("TEAM-A".to_owned())),
            1 => "[a-z-]{0,70}".prop_map(Some),
        ],
        prop_oneof![
            8 => Just(Some("application/json")),
            1 => Just(None),
            1 => prop::option::of(prop::sample::select(vec![
                "text/plain",
                "application/json; charset=utf-8",
                "multipart/form-data",
            ])),
        ],
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "x-semantis-cache-bypass",
                    "x-semantis-cache-ttl",
                    "x-semantis-min-similarity",
                    "x-semantis-namespace",
                    "x-semantis-cache-only",
                    "x-request-id",
                    "x-semantis-key",
                    "api-key",
                ]),
                "[ -~]{0,200}",
            ),
            0..3,
        ),
        body(),
    )
        .prop_map(
            |((method, route), key, tenant, content_type, extra_headers, body)| Case {
                method,
                route,
                key,
                tenant,
                content_type,
                extra_headers,
                body,
            },
        )
}

async fn send(s: &Server, c: &Case) -> anyhow::Result<(u16, String)> {
    let mut req = s
        .http
        .request(c.method.clone(), format!("{}{}", s.url, c.route));
    if let Some(k) = c.key {
        req = req.bearer_auth(k);
    }
    if let Some(t) = &c.tenant {
        req = req.header("x-semantis-tenant", t);
    }
    for (name, v) in &c.extra_headers {
        req = req.header(*name, v);
    }
    if let Some(ct) = c.content_type {
        req = req.header("content-type", ct);
    }
    req = match &c.body {
        Body::None => req,
        Body::Json(v) => req.body(v.to_string()),
        Body::Bytes(b) => req.body(b.clone()),
    };
    let res = req.send().await?;
    let status = res.status().as_u16();
    Ok((status, res.text().await?))
}

#[test]
fn random_requests_never_produce_a_5xx_or_an_unknown_error() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    // The local model, so stores without a vector are embedded (no 503 for want of one).
    let setup = Setup {
        local_model: true,
        dimension: 384,
        extra: "verifier = \"none\"".into(),
        ..Setup::default()
    };
    let s = rt.block_on(Server::start(dir.path(), &setup))?;
    let known: BTreeSet<&str> = semantis_dataplane::http::codes::TABLE
        .iter()
        .map(|i| i.name)
        .collect();
    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u32>::new());
    // The request before a transport failure: what it left the connection in matters.
    let previous = std::sync::Mutex::new(String::new());
    let outcome = runner.run(&case(), |c| {
        let sent = rt.block_on(send(&s, &c));
        let before = previous
            .lock()
            .map(|mut p| std::mem::replace(&mut *p, format!("{c:?}")))
            .unwrap_or_default();
        let (status, text) = sent.map_err(|e| {
            TestCaseError::fail(format!(
                "the request failed: {e:#} (the request before it: {before})"
            ))
        })?;
        if let Ok(mut seen) = seen.lock() {
            *seen.entry(status).or_default() += 1;
        }
        prop_assert!(status < 500, "{status} for {c:?}: {text}");
        if status >= 400 && !text.is_empty() {
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                TestCaseError::fail(format!("{status} without a JSON error body ({e}): {text}"))
            })?;
            let code = v["error"]["code"].as_str().unwrap_or_default();
            prop_assert!(
                known.contains(code) && v["error"]["type"].is_string(),
                "{status} with an unknown code for {c:?}: {text}"
            );
        }
        Ok(())
    });
    if let Err(e) = outcome {
        anyhow::bail!("{e}\n{}", s.log());
    }
    let seen = seen.into_inner().unwrap_or_default();
    eprintln!("statuses: {seen:?}");
    // Still serving.
    let (status, _) = rt.block_on(send(
        &s,
        &Case {
            method: reqwest::Method::GET,
            route: "/healthz",
            key: None,
            tenant: None,
            content_type: None,
            extra_headers: Vec::new(),
            body: Body::None,
        },
    ))?;
    anyhow::ensure!(status == 200);
    Ok(())
}

//! Reconcile against a scripted API server: each test states the exact requests it expects.

use std::sync::Arc;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use semantis_operator::crd::SemanticCache;
use semantis_operator::metrics::Metrics;
use semantis_operator::reconcile::{self, Context};
use semantis_operator::validate::OperatorDefaults;
use tower_test::mock::{Handle, SendResponse};

type Api = Handle<Request<Body>, Response<Body>>;

fn cache(spec: &str) -> SemanticCache {
    let yaml = format!(
        "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata:\n  name: c\n  namespace: ns\n  uid: 0000-1111\n  generation: 4\n  resourceVersion: \"10\"\n  finalizers: [semantis.dev/cleanup]\n{spec}"
    );
    serde_yaml::from_str(&yaml).expect("fixture parses")
}

fn context() -> (Arc<Context>, Api) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context {
        client: client.clone(),
        defaults: OperatorDefaults {
            dataplane_image: "img".into(),
            redis_image: semantis_operator::validate::DEFAULT_REDIS_IMAGE.into(),
        },
        metrics: Arc::new(Metrics::new().expect("metrics")),
        recorder: reconcile::recorder(client),
    };
    (Arc::new(ctx), handle)
}

async fn expect(
    api: &mut Api,
    method: Method,
    path: &str,
) -> (serde_json::Value, SendResponse<Response<Body>>) {
    let (req, send) = api.next_request().await.expect("a request");
    assert_eq!(
        (req.method(), req.uri().path()),
        (&method, path),
        "unexpected request"
    );
    let bytes = req.into_body().collect().await.expect("body").to_bytes();
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("json body")
    };
    (body, send)
}

fn reply(send: SendResponse<Response<Body>>, body: &serde_json::Value) {
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response"),
    );
}

#[tokio::test]
async fn an_invalid_spec_sets_conditions_once_and_waits_for_a_change() {
    // dimension 768 with the local model: CEL would refuse it, so this is the path for a CRD
    // installed without its rules (or a rule the server could not evaluate).
    let bad = cache("spec:\n  embedding: {provider: local, dimension: 768}\n  tenants: []\n");
    let (ctx, mut api) = context();
    let echo = serde_json::to_value(&bad).expect("json");
    let server = tokio::spawn(async move {
        let base = "/apis/semantis.dev/v1alpha1/namespaces/ns/semanticcaches/c";
        let (_, send) = expect(&mut api, Method::GET, &format!("{base}/status")).await;
        reply(send, &echo);
        let (event, send) = expect(
            &mut api,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/ns/events",
        )
        .await;
        assert_eq!(event["reason"], "InvalidSpec");
        assert_eq!(event["type"], "Warning");
        reply(send, &event);
        let (patch, send) = expect(&mut api, Method::PATCH, &format!("{base}/status")).await;
        let status = &patch["status"];
        assert_eq!(status["observedGeneration"], 4);
        let ready = status["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == "Ready")
            .expect("Ready");
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("InvalidSpec"))
        );
        assert!(
            ready["message"]
                .as_str()
                .is_some_and(|m| m.contains("spec.embedding.dimension"))
        );
        assert_eq!(ready["observedGeneration"], 4);
        reply(send, &echo);
        api
    });
    let action = reconcile::reconcile(Arc::new(bad), ctx)
        .await
        .expect("an invalid spec is not an error to retry");
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    let mut api = server.await.expect("scripted server");
    // Nothing else: no children were applied for a spec that does not validate (the client is
    // gone, so the script ends without another request).
    assert!(api.next_request().await.is_none());
}

#[tokio::test]
async fn a_paused_cache_touches_nothing() {
    let paused = cache(
        "spec:\n  embedding: {provider: local, dimension: 384}\n  tenants: []\n  paused: true\n",
    );
    let (ctx, mut api) = context();
    let action = reconcile::reconcile(Arc::new(paused), ctx)
        .await
        .expect("paused is fine");
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert!(
        api.next_request().await.is_none(),
        "a paused cache sent a request"
    );
}

#[tokio::test]
async fn a_newer_generation_on_the_server_defers_to_its_own_reconcile() {
    let stale = cache("spec:\n  embedding: {provider: local, dimension: 384}\n  tenants: []\n");
    let mut newer = serde_json::to_value(&stale).expect("json");
    newer["metadata"]["generation"] = 5.into();
    let (ctx, mut api) = context();
    let server = tokio::spawn(async move {
        let (_, send) = expect(
            &mut api,
            Method::GET,
            "/apis/semantis.dev/v1alpha1/namespaces/ns/semanticcaches/c/status",
        )
        .await;
        reply(send, &newer);
        api
    });
    let action = reconcile::reconcile(Arc::new(stale), ctx)
        .await
        .expect("ok");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_millis(200))
    );
    let mut api = server.await.expect("server");
    assert!(
        api.next_request().await.is_none(),
        "nothing applied from a stale spec"
    );
}

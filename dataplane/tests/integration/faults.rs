//! Fault injection: a loopback TCP proxy between the dataplane and a dependency, which a test
//! makes slow, hung (bytes held, connections kept open: a black hole) or cut (every
//! connection closed, new ones refused), and tests that count acknowledged writes lost and
//! deleted entries served across those faults.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::embedders::{DIM, Fake, key_file, start_fake};
use crate::harness::{
    KEY_A, Server, Setup, answer, fresh_database, metric_sum, private_redis, scattered,
    shared_postgres,
};

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Pass,
    /// Each chunk waits this long in each direction.
    Slow(Duration),
    /// Nothing is forwarded (bytes are held, not dropped) and connections stay open.
    Hang,
    /// Every open connection is closed, new ones are closed at once.
    Cut,
}

pub struct FaultProxy {
    /// `host:port` to dial instead of the dependency.
    pub addr: String,
    mode: watch::Sender<Mode>,
}

impl FaultProxy {
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind the fault proxy")?;
        let addr = listener.local_addr()?.to_string();
        let (mode, watching) = watch::channel(Mode::Pass);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, watching) = (upstream.clone(), watching.clone());
                tokio::spawn(async move {
                    if *watching.borrow() == Mode::Cut {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Either direction ending ends both.
                    tokio::select! {
                        () = pipe(cr, sw, watching.clone()) => {}
                        () = pipe(sr, cw, watching) => {}
                    }
                });
            }
        });
        Ok(Self { addr, mode })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Mode::Cut {
                    return;
                }
                continue;
            }
        };
        // Hold the bytes while hung; close on a cut.
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Mode::Pass => break,
                Mode::Slow(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Cut => return,
                Mode::Hang => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The dependency a run puts behind the proxy.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dependency {
    Redis,
    Postgres,
    Embedder,
}

/// `host:port` of a URL (`scheme://[user@]host:port[/path]`).
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// Cluster mode (Redis, Postgres) with `dependency` reached through the proxy. The embedder
/// run embeds text with the fake OpenAI-style server; the others store vectors.
async fn through_proxy(
    dependency: Dependency,
    name: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(Setup, FaultProxy, Option<Fake>)> {
    let redis = private_redis(name)?;
    let postgres = fresh_database(&shared_postgres()?).await?;
    let mut setup = Setup {
        redis_url: Some(redis.clone()),
        postgres_url: Some(postgres.clone()),
        ..Setup::default()
    };
    let (proxy, fake) = match dependency {
        Dependency::Redis => {
            let proxy = FaultProxy::start(host_port(&redis)).await?;
            setup.redis_url = Some(format!("redis://{}", proxy.addr));
            (proxy, None)
        }
        Dependency::Postgres => {
            let upstream = host_port(&postgres);
            let proxy = FaultProxy::start(upstream.clone()).await?;
            setup.postgres_url = Some(postgres.replacen(&upstream, &proxy.addr, 1));
            (proxy, None)
        }
        Dependency::Embedder => {
            let (url, fake) = start_fake().await?;
            let proxy = FaultProxy::start(host_port(&url)).await?;
            let key = key_file(dir)?;
            setup.embedder = Some(format!(
                "provider = \"openai\"\nmodel = \"fake-embed\"\ndimension = {DIM}\n\
                 endpoint = \"http://{}\"\napi_key_file = \"{}\"\ntimeout_ms = 1000\n",
                proxy.addr,
                key.display()
            ));
            // The semantic lookup is the same words in another order (the fake's same vector):
            // cosine decides. The local verifier would judge the reordering, and on a loaded
            // machine its time budget turned one lookup into a miss (`verifier_over_budget`),
            // which says nothing about the embedder's faults.
            setup.extra = "verifier = \"none\"".into();
            (proxy, Some(fake))
        }
    };
    Ok((setup, proxy, fake))
}

/// How a run stores and looks up entry `n`: by vector, or (embedder runs) by text, where a
/// semantic lookup uses the same words in another order.
#[derive(Clone, Copy)]
struct Shape(Dependency);

impl Shape {
    fn prompt(self, n: u64) -> String {
        format!("fault question {n} word{n}")
    }

    fn store(self, n: u64) -> serde_json::Value {
        let prompt = self.prompt(n);
        match self.0 {
            Dependency::Embedder => json!({"prompt": prompt, "response": answer(&prompt)}),
            _ => json!({"prompt": prompt, "vector": scattered(8, n), "response": answer(&prompt)}),
        }
    }

    fn semantic(self, n: u64) -> serde_json::Value {
        match self.0 {
            Dependency::Embedder => json!({"prompt": format!("word{n} {n} question fault")}),
            _ => json!({"vector": scattered(8, n)}),
        }
    }

    fn exact(self, n: u64) -> serde_json::Value {
        json!({"prompt": self.prompt(n)})
    }
}

/// Rounds of stores and deletes while `dependency` is slow, hung, cut and back. Whatever was
/// acknowledged (201) must answer afterwards, and whatever was deleted (204) must never be
/// served: during the faults, after them, and after a restart.
async fn faults_lose_nothing(dependency: Dependency, name: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (setup, proxy, _fake) = through_proxy(dependency, name, dir.path()).await?;
    let shape = Shape(dependency);
    let s = Server::start(dir.path(), &setup).await?;
    let acknowledged = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let deleted = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let (mut refused, mut deferred, mut stats_down) = (0u32, 0u32, 0u32);
    let mut violations = Vec::<String>::new();
    let mut n: u64 = 0;
    for mode in [
        Mode::Pass,
        Mode::Slow(Duration::from_millis(30)),
        Mode::Hang,
        Mode::Pass,
        Mode::Cut,
        Mode::Pass,
    ] {
        proxy.set(mode);
        let started = std::time::Instant::now();
        for _ in 0..6 {
            n += 1;
            let (status, v, _) = s
                .call(
                    Method::POST,
                    "/v1/entries",
                    Some(KEY_A),
                    Some(&shape.store(n)),
                )
                .await?;
            match status {
                201 => {
                    let id = v["id"].as_str().context("id")?.to_owned();
                    deferred += u32::from(v["embedding_pending"] == true);
                    // Every third acknowledged store is deleted again.
                    if n.is_multiple_of(3) {
                        let (status, _, _) = s
                            .call(
                                Method::DELETE,
                                &format!("/v1/entries/{id}"),
                                Some(KEY_A),
                                None,
                            )
                            .await?;
                        if status == 204 {
                            deleted.lock().push((n, id));
                            continue;
                        }
                    }
                    acknowledged.lock().push((n, id));
                }
                // Refused clearly: the client knows it was not stored.
                503 if matches!(
                    v["error"]["code"].as_str(),
                    Some("store_unavailable" | "embedder_unavailable")
                ) =>
                {
                    refused += 1;
                }
                _ => violations.push(format!("{mode:?}: store answered {status}: {v}")),
            }
        }
        let stores = started.elapsed();
        // Deleted entries stay gone, whatever the dependency is doing.
        let started = std::time::Instant::now();
        let gone = deleted.lock().clone();
        for (m, id) in &gone {
            for body in [shape.exact(*m), shape.semantic(*m)] {
                if let Ok(v) = s.lookup(KEY_A, body).await
                    && v["entry_id"] == id.as_str()
                {
                    violations.push(format!("{mode:?}: deleted entry {m} served"));
                }
            }
        }
        let lookups = started.elapsed();
        let (status, _, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
        stats_down += u32::from(matches!(status, 503 | 504));
        eprintln!(
            "{dependency:?} {mode:?}: 6 stores took {stores:?}, {} lookups of deleted entries {lookups:?}, /v1/stats {status}",
            gone.len() * 2
        );
    }
    proxy.set(Mode::Pass);
    let (kept, gone) = (acknowledged.lock().clone(), deleted.lock().clone());
    // Stores deferred while the embedder was away are embedded once it is back.
    if deferred > 0 {
        s.eventually(
            "the deferred stores embedded",
            Duration::from_secs(30),
            || async {
                let text = s.metrics().await?;
                Ok(
                    metric_sum(&text, "semantis_cache_stores_deferred_total", &[])
                        <= metric_sum(&text, "semantis_cache_pending_embedded_total", &[])
                            + gone.len() as f64,
                )
            },
        )
        .await?;
    }
    violations.extend(check(&s, shape, "after the faults", &kept, &gone).await?);
    let s = s.restart().await?;
    violations.extend(check(&s, shape, "after a restart", &kept, &gone).await?);
    assert!(
        violations.is_empty(),
        "{} violations: {violations:#?}\n{}",
        violations.len(),
        s.log()
    );
    let (acknowledged, deleted) = (acknowledged.lock().len(), deleted.lock().len());
    eprintln!(
        "{dependency:?}: {acknowledged} acknowledged, {deleted} deleted, {refused} refused, {deferred} deferred, /v1/stats down {stats_down} times"
    );
    assert!(
        acknowledged >= 12 && deleted >= 4,
        "the rounds did not run: {acknowledged} acknowledged, {deleted} deleted"
    );
    // Each fault was felt where it should be.
    let felt = match dependency {
        Dependency::Redis => refused >= 1,
        Dependency::Postgres => stats_down >= 1,
        Dependency::Embedder => deferred + refused >= 1,
    };
    assert!(
        felt,
        "{dependency:?}: the faults were not felt: {refused} refused, {deferred} deferred, /v1/stats down {stats_down} times"
    );
    Ok(())
}

#[tokio::test]
async fn redis_slow_hung_and_cut_loses_no_acknowledged_store_and_serves_no_deleted_entry()
-> anyhow::Result<()> {
    faults_lose_nothing(Dependency::Redis, "faults").await
}

#[tokio::test]
async fn postgres_slow_hung_and_cut_loses_no_acknowledged_store_and_serves_no_deleted_entry()
-> anyhow::Result<()> {
    faults_lose_nothing(Dependency::Postgres, "faults-pg").await
}

#[tokio::test]
async fn embedder_slow_hung_and_cut_loses_no_acknowledged_store_and_serves_no_deleted_entry()
-> anyhow::Result<()> {
    faults_lose_nothing(Dependency::Embedder, "faults-embed").await
}

/// Every acknowledged entry answers on both paths; no deleted entry does.
async fn check(
    s: &Server,
    shape: Shape,
    when: &str,
    acknowledged: &[(u64, String)],
    deleted: &[(u64, String)],
) -> anyhow::Result<Vec<String>> {
    let mut wrong = Vec::new();
    for (m, id) in acknowledged {
        for (path, body) in [("exact", shape.exact(*m)), ("semantic", shape.semantic(*m))] {
            let v = s.lookup(KEY_A, body).await?;
            if v["entry_id"] != id.as_str() {
                wrong.push(format!(
                    "{when}: acknowledged store {m} not found on the {path} path: {v}"
                ));
            }
        }
    }
    for (m, id) in deleted {
        for body in [shape.exact(*m), shape.semantic(*m)] {
            let v = s.lookup(KEY_A, body).await?;
            if v["entry_id"] == id.as_str() {
                wrong.push(format!("{when}: deleted entry {m} served: {v}"));
            }
        }
    }
    Ok(wrong)
}

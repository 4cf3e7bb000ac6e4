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

use crate::harness::{
    KEY_A, Server, Setup, answer, fresh_database, private_redis, scattered, shared_postgres,
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

/// Cluster mode with Redis behind the proxy.
async fn through_proxy(name: &str) -> anyhow::Result<(Setup, FaultProxy)> {
    let redis = private_redis(name)?;
    let upstream = redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = FaultProxy::start(upstream).await?;
    Ok((
        Setup {
            redis_url: Some(format!("redis://{}", proxy.addr)),
            postgres_url: Some(fresh_database(&shared_postgres()?).await?),
            ..Setup::default()
        },
        proxy,
    ))
}

/// Rounds of stores and deletes while Redis is slow, hung, cut and back. Whatever was
/// acknowledged (201) must answer afterwards, and whatever was deleted (204) must never be
/// served: during the faults, after them, and after a restart.
#[tokio::test]
async fn redis_slow_hung_and_cut_loses_no_acknowledged_store_and_serves_no_deleted_entry()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (setup, proxy) = through_proxy("faults").await?;
    let s = Server::start(dir.path(), &setup).await?;
    let acknowledged = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let deleted = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let (mut refused, mut violations) = (0u32, Vec::<String>::new());
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
        for _ in 0..6 {
            n += 1;
            let prompt = format!("fault question {n}");
            let (status, v, _) = s
                .call(
                    Method::POST,
                    "/v1/entries",
                    Some(KEY_A),
                    Some(&json!({"prompt": prompt, "vector": scattered(8, n), "response": answer(&prompt)})),
                )
                .await?;
            match status {
                201 => {
                    let id = v["id"].as_str().context("id")?.to_owned();
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
                503 if v["error"]["code"] == "store_unavailable" => refused += 1,
                _ => violations.push(format!("{mode:?}: store answered {status}: {v}")),
            }
        }
        // Deleted entries stay gone, whatever Redis is doing.
        let started = std::time::Instant::now();
        let gone = deleted.lock().clone();
        for (m, id) in &gone {
            let v = s
                .lookup(KEY_A, json!({"prompt": format!("fault question {m}")}))
                .await;
            if let Ok(v) = v
                && v["entry_id"] == id.as_str()
            {
                violations.push(format!("{mode:?}: deleted entry {m} served"));
            }
        }
        eprintln!(
            "{mode:?}: {} lookups of deleted entries took {:?}",
            gone.len(),
            started.elapsed()
        );
    }
    proxy.set(Mode::Pass);
    let (kept, gone) = (acknowledged.lock().clone(), deleted.lock().clone());
    violations.extend(check(&s, "after the faults", &kept, &gone).await?);
    let s = s.restart().await?;
    violations.extend(check(&s, "after a restart", &kept, &gone).await?);
    assert!(
        violations.is_empty(),
        "{} violations: {violations:#?}\n{}",
        violations.len(),
        s.log()
    );
    let (acknowledged, deleted) = (acknowledged.lock().len(), deleted.lock().len());
    assert!(
        acknowledged >= 12 && deleted >= 4 && refused >= 1,
        "the faults were not exercised: {acknowledged} acknowledged, {deleted} deleted, {refused} refused"
    );
    eprintln!("{acknowledged} acknowledged, {deleted} deleted, {refused} refused");
    Ok(())
}

/// Every acknowledged entry answers on both paths; no deleted entry does.
async fn check(
    s: &Server,
    when: &str,
    acknowledged: &[(u64, String)],
    deleted: &[(u64, String)],
) -> anyhow::Result<Vec<String>> {
    let mut wrong = Vec::new();
    for (m, id) in acknowledged {
        let v = s
            .lookup(KEY_A, json!({"prompt": format!("fault question {m}")}))
            .await?;
        if v["entry_id"] != id.as_str() {
            wrong.push(format!("{when}: acknowledged store {m} lost: {v}"));
        }
        let v = s.lookup(KEY_A, json!({"vector": scattered(8, *m)})).await?;
        if v["entry_id"] != id.as_str() {
            wrong.push(format!(
                "{when}: acknowledged store {m} not found by vector: {v}"
            ));
        }
    }
    for (m, id) in deleted {
        for body in [
            json!({"prompt": format!("fault question {m}")}),
            json!({"vector": scattered(8, *m)}),
        ] {
            let v = s.lookup(KEY_A, body).await?;
            if v["entry_id"] == id.as_str() {
                wrong.push(format!("{when}: deleted entry {m} served: {v}"));
            }
        }
    }
    Ok(wrong)
}

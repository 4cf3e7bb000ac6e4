//! The command-line tools besides `serve`, run as a user runs them.

use std::process::Command;

use serde_json::Value;

use crate::harness::{KEY_A, Server, Setup, sha};

fn bench(server: &Server, args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"))
        .arg("bench")
        .args([
            "--url",
            &server.url,
            "--api-key",
            KEY_A,
            "--dimension",
            "64",
        ])
        .args(["--duration", "1s", "--warmup", "100ms", "--json"])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test]
async fn bench_reports_each_scenario_against_a_running_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // 64 dimensions: random vectors are then nearly orthogonal, so `miss` really misses.
    let setup = Setup {
        dimension: 64,
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    let exact = bench(&s, &["--scenario", "exact-hit", "--seed", "50"])?;
    assert_eq!(exact["errors"], 0, "{exact}");
    assert!(exact["requests"].as_u64().unwrap_or(0) > 0);
    assert_eq!(exact["hit_ratio"], 1.0, "{exact}");
    for key in ["p50_ms", "p95_ms", "p99_ms", "p999_ms", "throughput_rps"] {
        assert!(
            exact[key].as_f64().is_some_and(|v| v > 0.0),
            "{key} in {exact}"
        );
    }
    let semantic = bench(
        &s,
        &["--scenario", "semantic-vector", "--seed", "50", "--seeded"],
    )?;
    assert_eq!(semantic["hit_ratio"], 1.0, "{semantic}");
    let miss = bench(&s, &["--scenario", "miss"])?;
    assert_eq!(miss["hit_ratio"], 0.0, "{miss}");
    // Open loop: a fixed rate, so the request count follows the rate, not the server.
    let store = bench(
        &s,
        &["--scenario", "store", "--rate", "100", "--connections", "2"],
    )?;
    assert_eq!(store["mode"], "open");
    assert_eq!(store["errors"], 0, "{store}");
    let n = store["requests"].as_u64().unwrap_or(0);
    assert!(
        (90..=110).contains(&n),
        "{n} stores at 100/s for 1 s: {store}"
    );
    Ok(())
}

#[tokio::test]
async fn bench_refuses_a_hit_scenario_without_entries() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"))
        .args(["bench", "--api-key", "k", "--scenario", "exact-hit"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seed"));
    Ok(())
}

#[test]
fn hash_key_prints_the_configured_hash() -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(b"my-secret-key\n")?;
    let out = child.wait_with_output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha("my-secret-key")
    );
    Ok(())
}

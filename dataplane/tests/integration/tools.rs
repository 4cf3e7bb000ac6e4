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

#[test]
fn bench_measures_the_local_model_in_process() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"))
        .args([
            "bench",
            "--scenario",
            "embed-local",
            "--duration",
            "1s",
            "--warmup",
            "100ms",
            "--json",
        ])
        .arg("--model-dir")
        .arg(crate::harness::model_dir())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert!(v["single_requests"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(v["p50_ms"].as_f64().is_some_and(|p| p > 0.0), "{v}");
    assert!(
        v["batch32_texts_per_s"].as_f64().is_some_and(|t| t > 0.0),
        "{v}"
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

fn write_gz(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut gz =
        flate2::write::GzEncoder::new(std::fs::File::create(path)?, flate2::Compression::default());
    gz.write_all(text.as_bytes())?;
    gz.finish()?;
    Ok(())
}

#[test]
fn eval_reports_the_quality_curve_as_table_csv_and_png() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dataset = dir.path().join("pairs.jsonl.gz");
    let pairs = [
        (
            "How do I reset my password?",
            "How can I reset my password?",
            true,
        ),
        (
            "What is the capital of France?",
            "What's the capital city of France?",
            true,
        ),
        (
            "How do I learn to play the guitar?",
            "What is the best way to learn guitar?",
            true,
        ),
        (
            "How tall is Mount Everest?",
            "Which stocks should I buy this year?",
            false,
        ),
        (
            "What causes rain?",
            "How do I bake sourdough bread at home?",
            false,
        ),
    ];
    let text: String = pairs
        .iter()
        .map(|(a, b, d)| format!("{}\n", serde_json::json!({"a": a, "b": b, "duplicate": d})))
        .collect();
    write_gz(&dataset, &text)?;
    let config = dir.path().join("eval.toml");
    std::fs::write(
        &config,
        format!(
            "[embedder]\nprovider = \"local\"\nmodel_dir = \"{}\"\n",
            crate::harness::model_dir().display()
        ),
    )?;
    let (csv, png) = (dir.path().join("curve.csv"), dir.path().join("curve.png"));
    let out = Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"))
        .arg("eval")
        .arg("--dataset")
        .arg(&dataset)
        .arg("--config")
        .arg(&config)
        .arg("--csv")
        .arg(&csv)
        .arg("--plot")
        .arg(&png)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("pairs 5 (from pair 0)  duplicates 3"),
        "{stdout}"
    );
    // The local verifier's file is installed beside the model, so the default is verified.
    assert!(stdout.contains("verifier local"), "{stdout}");
    // curve,floor,threshold,hit_rate,precision,recall,f1
    let csv = std::fs::read_to_string(&csv)?;
    let rows = |curve: &str| -> Vec<Vec<f64>> {
        csv.lines()
            .skip(1)
            .filter(|l| l.split(',').next() == Some(curve))
            .map(|l| {
                l.split(',')
                    .skip(2)
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .collect()
    };
    let cosine = rows("cosine");
    assert_eq!(cosine.len(), 29, "thresholds 0.70..=0.98");
    // At 0.70 the paraphrases hit their own question and the unrelated pairs miss.
    assert_eq!(cosine[0][0], 0.70);
    assert_eq!(cosine[0][2], 1.0, "precision at 0.70: {:?}", cosine[0]);
    assert!(cosine[0][3] >= 2.0 / 3.0, "recall at 0.70: {:?}", cosine[0]);
    // Hit rate never grows with the threshold.
    assert!(cosine.windows(2).all(|w| w[1][1] <= w[0][1]));
    // The verifier's curves: four cosine floors, scores 0.05..=0.95, hit rate never growing
    // with the score; the paraphrases it passes are right ones.
    let verified = rows("local");
    assert_eq!(verified.len(), 4 * 19, "{csv}");
    assert!(
        verified
            .windows(2)
            .all(|w| w[1][0] < w[0][0] || w[1][1] <= w[0][1])
    );
    assert!(verified.iter().all(|r| r[2] == 1.0), "{csv}");
    assert!(stdout.contains("waited p50"), "{stdout}");
    let image = std::fs::read(&png)?;
    assert_eq!(&image[..8], b"\x89PNG\r\n\x1a\n");

    // A malformed line is a clear error naming it.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"a\": \"x\", \"b\": \"y\", \"duplicate\": true}\nnot json\n",
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"))
        .args(["eval", "--dataset"])
        .arg(&bad)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
    Ok(())
}

/// A pidfile outlives its process when the machine is killed mid-run (CI does that). Its pid
/// may since belong to anything; scripts/services.sh once killed whatever held it, its own
/// run included. Starting over a stale pidfile must leave that process alone, stop, start
/// again and answer.
#[test]
fn services_never_stop_a_process_a_stale_pidfile_names() -> anyhow::Result<()> {
    use crate::harness::services;
    let name = "stale-pidfile";
    services(&["stop-redis", name])?;
    let root = std::env::var("SEMANTIS_SERVICES_DIR")
        .unwrap_or_else(|_| "/tmp/semantis-services".to_owned());
    let dir = std::path::Path::new(&root).join(format!("redis-{name}"));
    std::fs::create_dir_all(&dir)?;
    // An unrelated process, and a dead Redis's pidfile that now names it.
    let mut bystander = Command::new("sleep").arg("60").spawn()?;
    std::fs::write(dir.join("redis.pid"), format!("{}\n", bystander.id()))?;
    let url = services(&["redis", name]);
    let alive = bystander.try_wait()?.is_none();
    bystander.kill()?;
    bystander.wait()?;
    let url = url?;
    assert!(
        alive,
        "starting Redis `{name}` killed the process its stale pidfile named"
    );
    let pong = Command::new("redis-cli")
        .args(["-u", &url, "ping"])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&pong.stdout).trim(), "PONG");
    // Stopping goes by the live Redis, not by a pid that may be someone else's.
    services(&["stop-redis", name])?;
    let pong = Command::new("redis-cli")
        .args(["-u", &url, "ping"])
        .output()?;
    assert_ne!(
        String::from_utf8_lossy(&pong.stdout).trim(),
        "PONG",
        "{url} still answers"
    );
    Ok(())
}

//! `backup` and `restore` against a real S3-compatible server (MinIO, built and started by
//! scripts/services.sh): round trip into empty stores, refusal of a non-empty target,
//! retention, and corrupt or partial backups refused without touching the target.

use std::path::Path;
use std::process::{Command, Output};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use serde_json::json;

use crate::harness::{KEY_A, KEY_B, Server, Setup, answer, scattered, services};

struct S3 {
    env: Vec<(String, String)>,
    client: Client,
    bucket: String,
}

async fn minio() -> anyhow::Result<S3> {
    let out = services(&["minio", "shared"])?;
    let mut env: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let endpoint = env
        .iter()
        .find(|(k, _)| k == "SEMANTIS_TEST_S3_ENDPOINT")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| anyhow::anyhow!("services.sh printed no MinIO endpoint"))?;
    env.push(("AWS_ENDPOINT_URL".into(), endpoint.clone()));
    env.push(("AWS_REGION".into(), "us-east-1".into()));
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let creds = aws_sdk_s3::config::Credentials::new(
        get("AWS_ACCESS_KEY_ID"),
        get("AWS_SECRET_ACCESS_KEY"),
        None,
        None,
        "test",
    );
    let http = aws_smithy_http_client::Builder::new().build_http();
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version_latest()
        .endpoint_url(&endpoint)
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .force_path_style(true)
        .http_client(http)
        .build();
    let client = Client::from_conf(conf);
    let bucket = format!(
        "semantis-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    client.create_bucket().bucket(&bucket).send().await?;
    Ok(S3 {
        env,
        client,
        bucket,
    })
}

impl S3 {
    fn run(&self, args: &[&str], config: &Path) -> anyhow::Result<Output> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"));
        cmd.args(args).arg("--config").arg(config);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Ok(cmd
            .env("RUST_LOG", "info,lance=warn,lancedb=warn")
            .output()?)
    }

    fn backup(&self, config: &Path, extra: &[&str]) -> anyhow::Result<String> {
        let to = format!("s3://{}/nightly", self.bucket);
        let mut args = vec!["backup", "--to", &to];
        args.extend_from_slice(extra);
        let out = self.run(&args, config)?;
        anyhow::ensure!(
            out.status.success(),
            "backup failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn restore(&self, config: &Path, backup: Option<&str>) -> anyhow::Result<Output> {
        let from = format!("s3://{}/nightly", self.bucket);
        let mut args = vec!["restore", "--from", &from];
        if let Some(b) = backup {
            args.extend(["--backup", b]);
        }
        self.run(&args, config)
    }

    async fn keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .send()
            .await?;
        Ok(out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect())
    }

    async fn backups(&self) -> anyhow::Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .keys("nightly/")
            .await?
            .iter()
            .filter_map(|k| k.strip_suffix("/manifest.json"))
            .filter_map(|k| k.strip_prefix("nightly/"))
            .map(str::to_owned)
            .collect();
        ids.sort();
        Ok(ids)
    }
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test]
async fn backup_wipe_restore_answers_identically_and_bad_backups_are_refused() -> anyhow::Result<()>
{
    let s3 = minio().await?;
    let dir = tempfile::tempdir()?;
    let setup = Setup::default();
    let mut s = Server::start(dir.path(), &setup).await?;
    let mut stored = Vec::new();
    for i in 0..60 {
        let key = if i % 4 == 0 { KEY_B } else { KEY_A };
        let prompt = format!("backup question {i}");
        let id = s
            .store(
                key,
                json!({"prompt": prompt, "vector": scattered(8, i), "response": answer(&format!("r{i}"))}),
            )
            .await?;
        stored.push((key, prompt, i, id));
    }
    // Some usage, so the metadata has rows beyond tenants.
    s.lookup(KEY_A, json!({"prompt": "backup question 1"}))
        .await?;
    assert!(s.stop_gracefully()?, "{}", s.log());

    let first = s3.backup(&s.config_path, &[])?;
    assert!(s3.backups().await?.contains(&first));

    // A wiped volume: a new, empty data directory restored from the backup.
    let restored_root = dir.path().join("restored");
    std::fs::create_dir_all(&restored_root)?;
    let restored_cfg = restored_root.join("restore.toml");
    std::fs::write(&restored_cfg, setup.config(1, &restored_root.join("data")))?;
    let out = s3.restore(&restored_cfg, None)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), first);
    let r = Server::start(&restored_root, &setup).await?;
    for (key, prompt, i, id) in &stored {
        let exact = r.lookup(key, json!({"prompt": prompt})).await?;
        assert_eq!(
            (exact["hit"].as_bool(), exact["entry_id"].as_str()),
            (Some(true), Some(id.as_str())),
            "{prompt}: {exact}"
        );
        let semantic = r.lookup(key, json!({"vector": scattered(8, *i)})).await?;
        assert_eq!(
            semantic["entry_id"].as_str(),
            Some(id.as_str()),
            "{semantic}"
        );
        assert_eq!(semantic["response"], answer(&format!("r{i}")));
    }
    let (_, stats, _) = r
        .call(reqwest::Method::GET, "/v1/stats", Some(KEY_A), None)
        .await?;
    assert_eq!(stats["entries"], 45, "{stats}");
    assert!(
        stats["lookups"].as_u64() >= Some(1),
        "usage came back: {stats}"
    );

    // Restoring over a cache that exists is refused.
    let out = s3.restore(&restored_cfg, None)?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restore needs empty stores"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... unless asked to restore only into empty stores (the operator's bootstrap runs at
    // every pod start): then it is a no-op that succeeds, and the cache is unchanged.
    let from = format!("s3://{}/nightly", s3.bucket);
    let out = s3.run(&["restore", "--from", &from, "--if-empty"], &restored_cfg)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = r
        .lookup(KEY_A, json!({"prompt": "backup question 1"}))
        .await?;
    assert_eq!(v["hit"], true, "{v}");
    drop(r);

    // Retention: three more backups with --keep 2 leave exactly the newest two.
    let mut ids = vec![first.clone()];
    for _ in 0..3 {
        ids.push(s3.backup(&s.config_path, &["--keep", "2"])?);
    }
    assert_eq!(s3.backups().await?, ids[2..].to_vec());
    assert!(s3.keys(&format!("nightly/{first}/")).await?.is_empty());

    // A corrupted object is caught before anything reaches the target.
    let newest = ids[3].clone();
    let victim = s3
        .keys(&format!("nightly/{newest}/lance/"))
        .await?
        .into_iter()
        .find(|k| k.ends_with(".lance") && k.contains("/data/"))
        .ok_or_else(|| anyhow::anyhow!("the backup holds no data file"))?;
    s3.client
        .put_object()
        .bucket(&s3.bucket)
        .key(&victim)
        .body(ByteStream::from(b"not a lance file".to_vec()))
        .send()
        .await?;
    let empty_root = dir.path().join("empty");
    std::fs::create_dir_all(&empty_root)?;
    let empty_cfg = empty_root.join("restore.toml");
    std::fs::write(&empty_cfg, setup.config(1, &empty_root.join("data")))?;
    let out = s3.restore(&empty_cfg, Some(&newest))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the backup is corrupt") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(
        is_empty_dir(&empty_root.join("data/lance")),
        "the target stays empty"
    );

    // A partial backup (an object gone) too.
    let older = ids[2].clone();
    let gone = s3
        .keys(&format!("nightly/{older}/lance/"))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the backup holds no table file"))?;
    s3.client
        .delete_object()
        .bucket(&s3.bucket)
        .key(&gone)
        .send()
        .await?;
    let out = s3.restore(&empty_cfg, Some(&older))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("the backup is partial"), "{err}");
    assert!(is_empty_dir(&empty_root.join("data/lance")));
    Ok(())
}

/// S3 behind the fault proxy: a backup against a server that stops answering (connections
/// left open) or that goes away mid-upload fails with a clear error within its attempt
/// timeouts, never hangs the Job, and never leaves a backup that `restore` would pick: the
/// last complete one is still the one restored. With the server back, the next backup lands.
#[tokio::test]
async fn s3_hung_or_cut_mid_backup_fails_cleanly_and_restore_keeps_the_last_complete_backup()
-> anyhow::Result<()> {
    use crate::faults::{FaultProxy, Mode};

    let s3 = minio().await?;
    let dir = tempfile::tempdir()?;
    let setup = Setup::default();
    let mut s = Server::start(dir.path(), &setup).await?;
    for i in 0..40 {
        s.store(
            KEY_A,
            json!({"prompt": format!("fault backup {i}"), "vector": scattered(8, i), "response": answer("r")}),
        )
        .await?;
    }
    assert!(s.stop_gracefully()?, "{}", s.log());
    let first = s3.backup(&s.config_path, &[])?;

    let endpoint = s3
        .env
        .iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| anyhow::anyhow!("no S3 endpoint"))?;
    let upstream = endpoint.trim_start_matches("http://").to_owned();
    let proxy = FaultProxy::start(upstream).await?;
    let via_proxy = |timeout_secs: u64| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"));
        let to = format!("s3://{}/nightly", s3.bucket);
        cmd.args(["backup", "--to", &to, "--config"])
            .arg(&s.config_path)
            .env("RUST_LOG", "info,lance=warn,lancedb=warn");
        for (k, v) in &s3.env {
            cmd.env(k, v);
        }
        cmd.env("AWS_ENDPOINT_URL", format!("http://{}", proxy.addr))
            .env("SEMANTIS_S3_ATTEMPT_TIMEOUT_SECS", timeout_secs.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    };
    // Far past 3 attempts of 2 s and the SDK's backoff: only a hung backup reaches it.
    let bound = std::time::Duration::from_secs(120);

    // Hung: the server takes the bytes and never answers. Three attempts of 2 s and the SDK's
    // backoff take about 7 s; without `--s3-attempt-timeout-secs` the SDK's own defaults
    // gave up after about 90 s here, so 45 s tells the configured bound from the default.
    proxy.set(Mode::Hang);
    let hung_bound = std::time::Duration::from_secs(45);
    let out = tokio::time::timeout(hung_bound, via_proxy(2).output())
        .await
        .map_err(|_| anyhow::anyhow!("the backup hung against a hung S3"))??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("failed to upload"), "{err}");

    // Cut mid-upload: slowed down until the first objects of the new backup land, then cut.
    proxy.set(Mode::Slow(std::time::Duration::from_millis(100)));
    let running = via_proxy(30).spawn()?;
    let before = s3.keys("nightly/").await?.len();
    let deadline = std::time::Instant::now() + bound;
    while s3.keys("nightly/").await?.len() == before {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the backup never uploaded an object"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proxy.set(Mode::Cut);
    let out = tokio::time::timeout(bound, running.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("the backup hung against a cut S3"))??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("failed to"), "{err}");
    assert!(
        s3.keys("nightly/").await?.len() > before,
        "the cut came before any upload"
    );

    // Neither attempt left a backup restore would take: the first is still the newest.
    assert_eq!(s3.backups().await?, vec![first.clone()]);
    let target = dir.path().join("restored");
    std::fs::create_dir_all(&target)?;
    let cfg = target.join("restore.toml");
    std::fs::write(&cfg, setup.config(1, &target.join("data")))?;
    let out = s3.restore(&cfg, None)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), first);

    // The server is back: the next backup through the same proxy lands.
    proxy.set(Mode::Pass);
    let out = tokio::time::timeout(bound, via_proxy(30).output())
        .await
        .map_err(|_| anyhow::anyhow!("the backup hung"))??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(s3.backups().await?, vec![first, second]);
    Ok(())
}

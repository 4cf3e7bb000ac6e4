//! Starts the real `semantis-dataplane serve` binary on a free loopback port with a config
//! written for the test, and talks to it over HTTP like a client would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

pub const KEY_A: &str = "key-team-a";
pub const KEY_B: &str = "key-team-b";
pub const ADMIN: &str = "key-admin";

pub fn sha(key: &str) -> String {
    semantis_cache::tenants::hash_key(key)
}

/// Settings a test may change; everything else is a fast embedded-mode config.
#[derive(Clone)]
pub struct Setup {
    pub dimension: usize,
    pub local_model: bool,
    pub extra: String,
    /// Extra `[storage]` lines.
    pub storage_extra: String,
    /// Extra `[server]` lines.
    pub server_extra: String,
    pub tenant_a_extra: String,
    pub tenant_b_extra: String,
    pub flush_max_rows: usize,
    pub max_body_bytes: usize,
    /// `cache.min_similarity`; `None` leaves the default (0.9, or a verifier's own floor).
    pub min_similarity: Option<f32>,
    /// Cluster-mode metadata: a Postgres URL.
    pub postgres_url: Option<String>,
    /// Cluster mode: a Redis URL for the log and the hot layer.
    pub redis_url: Option<String>,
    /// The `[embedder]` section's body, replacing the default (`none` or `local`).
    pub embedder: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            dimension: 8,
            local_model: false,
            extra: String::new(),
            storage_extra: String::new(),
            server_extra: String::new(),
            tenant_a_extra: String::new(),
            tenant_b_extra: String::new(),
            flush_max_rows: 64,
            max_body_bytes: 64 * 1024,
            min_similarity: Some(0.9),
            postgres_url: None,
            redis_url: None,
            embedder: None,
        }
    }
}

impl Setup {
    /// The local model (and, its file being installed, the local verifier) at
    /// `min_similarity` (`None`: the verifier file's own floor).
    pub fn local_model(min_similarity: Option<f32>) -> Self {
        Self {
            local_model: true,
            min_similarity,
            ..Self::default()
        }
    }

    pub fn config(&self, port: u16, data_dir: &Path) -> String {
        let embedder = if let Some(section) = &self.embedder {
            section.clone()
        } else if self.local_model {
            format!(
                "provider = \"local\"\nmodel_dir = \"{}\"\n",
                model_dir().display()
            )
        } else {
            format!("provider = \"none\"\ndimension = {}\n", self.dimension)
        };
        let postgres = self
            .postgres_url
            .as_ref()
            .map(|u| format!("[postgres]\nurl = \"{u}\"\n"))
            .unwrap_or_default();
        let redis = self
            .redis_url
            .as_ref()
            .map(|u| format!("[redis]\nurl = \"{u}\"\n"))
            .unwrap_or_default();
        format!(
            r#"
{postgres}
{redis}
[server]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:0"
max_body_bytes = {body}
shutdown_grace_ms = 5000
admin_key_sha256 = ["{admin}"]
{server_extra}

[storage]
data_dir = "{dir}"
flush_max_rows = {flush}
flush_interval_ms = 200
maintenance_interval_ms = 200
compact_min_fragments = 4
{storage_extra}

[embedder]
{embedder}

[cache]
{min_similarity}
# The local verifier reads each semantic candidate of tenants that name no verifier. Its
# production budget (300 ms) is about latency; on a loaded test machine it turned lookups
# that tests expect to hit into `verifier_over_budget` misses. Tests of the budget set their
# own per tenant.
verifier_budget_ms = 5000
{extra}

[[tenants]]
name = "team-a"
api_key_sha256 = ["{a}"]
{a_extra}

[[tenants]]
name = "team-b"
api_key_sha256 = ["{b}"]
{b_extra}
"#,
            body = self.max_body_bytes,
            admin = sha(ADMIN),
            dir = data_dir.display(),
            flush = self.flush_max_rows,
            extra = self.extra,
            storage_extra = self.storage_extra,
            server_extra = self.server_extra,
            a = sha(KEY_A),
            b = sha(KEY_B),
            a_extra = self.tenant_a_extra,
            b_extra = self.tenant_b_extra,
            min_similarity = self
                .min_similarity
                .map(|m| format!("min_similarity = {m}"))
                .unwrap_or_default(),
        )
    }
}

fn services_script() -> PathBuf {
    // At run time (cargo sets it for the test process): a binary reused from a shared target
    // dir may have been built in another checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../scripts/services.sh")
}

/// Run `scripts/services.sh ARGS` (the project's own installer and starter) and return stdout.
/// Calls are serialised: tests run in parallel, and two first-time installs or `initdb`s of
/// the same instance must not race.
pub fn services(args: &[&str]) -> anyhow::Result<String> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new("bash")
        .arg(services_script())
        .args(args)
        .output()
        .context("failed to run scripts/services.sh")?;
    anyhow::ensure!(
        out.status.success(),
        "scripts/services.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A fresh database in the Postgres at `server_url` (`postgres://…/postgres`).
pub async fn fresh_database(server_url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let name = format!("semantis_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(server_url).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    Ok(format!(
        "{}/{name}",
        server_url.trim_end_matches("/postgres")
    ))
}

/// A Redis instance of this test's own (started by scripts/services.sh), emptied: a rerun
/// reuses the instance but must not see the last run's log.
pub fn private_redis(name: &str) -> anyhow::Result<String> {
    let url = services(&["redis", name])?;
    let flushed = Command::new("redis-cli")
        .args(["-u", &url, "FLUSHALL"])
        .output()?;
    // redis-cli exits 0 on an error reply, so check the reply itself: a refused FLUSHALL
    // would leave an earlier run's log for this test to replay.
    let reply = String::from_utf8_lossy(&flushed.stdout);
    anyhow::ensure!(
        flushed.status.success() && reply.trim() == "OK",
        "failed to empty Redis `{name}`: {}",
        reply.trim()
    );
    Ok(url)
}

/// The shared Postgres instance, started once per test run.
pub fn shared_postgres() -> anyhow::Result<String> {
    let out = services(&["start"])?;
    Ok(out
        .lines()
        .find_map(|l| l.strip_prefix("SEMANTIS_TEST_POSTGRES_URL="))
        .context("services.sh printed no Postgres URL")?
        .to_owned())
}

/// The local model directory `scripts/fetch-model.sh` fills.
pub fn model_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SEMANTIS_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/semantis/models/all-MiniLM-L6-v2")
}

pub struct Server {
    child: Option<Child>,
    pub url: String,
    /// The metrics port: `/metrics` and the detailed `/readyz`.
    pub metrics_url: String,
    pub http: reqwest::Client,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    /// The CPUs the process may run on (`taskset -c`), when restricted.
    cpus: Option<String>,
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("failed to find a free port")?;
    Ok(l.local_addr()?.port())
}

impl Server {
    /// Start a server on a fresh data directory inside `root`.
    pub async fn start(root: &Path, setup: &Setup) -> anyhow::Result<Self> {
        Self::start_replica(root, "semantis", setup).await
    }

    /// Start a replica named `name` on `root/data`: replicas started on the same root share
    /// their LanceDB directory, as pods sharing a ReadWriteMany volume do.
    pub async fn start_replica(root: &Path, name: &str, setup: &Setup) -> anyhow::Result<Self> {
        Self::start_named(root, name, setup, None).await
    }

    /// Start a server that may run only on the CPUs in `cpus` (a `taskset -c` list), as a
    /// container pinned to them would.
    pub async fn start_on_cpus(root: &Path, setup: &Setup, cpus: &str) -> anyhow::Result<Self> {
        Self::start_named(root, "semantis", setup, Some(cpus.to_owned())).await
    }

    async fn start_named(
        root: &Path,
        name: &str,
        setup: &Setup,
        cpus: Option<String>,
    ) -> anyhow::Result<Self> {
        let data_dir = root.join("data");
        let (port, metrics_port) = (free_port()?, free_port()?);
        let config_path = root.join(format!("{name}.toml"));
        let text = regex_port(&setup.config(port, &data_dir), port, metrics_port);
        std::fs::write(&config_path, text)?;
        Self::launch(config_path, data_dir, port, metrics_port, cpus).await
    }

    /// Start again with `from` replaced by `to` in the config (a setting `Setup` does not
    /// offer), on the same data.
    pub async fn restart_with(self, from: &str, to: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(&self.config_path)?;
        anyhow::ensure!(text.contains(from), "the config has no `{from}`");
        std::fs::write(&self.config_path, text.replace(from, to))?;
        self.restart().await
    }

    /// Start again on the same config and data (after a stop or a kill).
    pub async fn restart(mut self) -> anyhow::Result<Self> {
        self.kill_hard();
        let text = std::fs::read_to_string(&self.config_path)?;
        let (port, metrics_port) = (free_port()?, free_port()?);
        let re = regex_port(&text, port, metrics_port);
        std::fs::write(&self.config_path, re)?;
        Self::launch(
            self.config_path.clone(),
            self.data_dir.clone(),
            port,
            metrics_port,
            self.cpus.take(),
        )
        .await
    }

    async fn launch(
        config_path: PathBuf,
        data_dir: PathBuf,
        port: u16,
        metrics_port: u16,
        cpus: Option<String>,
    ) -> anyhow::Result<Self> {
        let log_path = config_path.with_extension(format!("{port}.log"));
        let log = std::fs::File::create(&log_path)?;
        let binary = env!("CARGO_BIN_EXE_semantis-dataplane");
        // taskset execs the server: the child's pid is the server's.
        let mut command = match &cpus {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(list).arg(binary);
                // Sized by the CPUs given, whatever the test's own environment says.
                c.env_remove("RAYON_NUM_THREADS")
                    .env_remove("CANDLE_NUM_THREADS");
                c
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,lance=warn,lancedb=warn")
            // The replica's name, as a pod's name would be (it names the replica in leases).
            .env("HOSTNAME", config_path.file_stem().unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("failed to start semantis-dataplane")?;
        let mut server = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}"),
            http: reqwest::Client::new(),
            config_path,
            data_dir,
            log_path,
            cpus,
        };
        server.wait_ready(Duration::from_secs(120)).await?;
        Ok(server)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child_exited()? {
                bail!(
                    "the server exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the server was not ready within {within:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn child_exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("the server is not running"),
        }
    }

    /// `kill -9`: no drain, no flush.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited successfully.
    pub fn stop_gracefully(&mut self) -> anyhow::Result<bool> {
        self.signal_term()?;
        self.wait_exit()
    }

    /// Send SIGTERM without waiting.
    pub fn signal_term(&self) -> anyhow::Result<()> {
        self.signal("TERM")
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Freeze the process (SIGSTOP), as a stalled node or a long GC pause would.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    /// Let a paused process go on (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let Some(child) = self.child.as_ref() else {
            bail!("the server is not running");
        };
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "failed to send SIG{name}");
        Ok(())
    }

    /// Wait for the process to exit; returns whether it exited successfully.
    pub fn wait_exit(&mut self) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        Ok(child.wait()?.success())
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value, reqwest::header::HeaderMap)> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value, headers))
    }

    /// POST an entry until it is acknowledged (201), as a client retries a 503: on a loaded
    /// machine Redis's fsync-per-write can outlast the dataplane's 2 s reply deadline, and the
    /// store then answers 503 `store_unavailable`, acknowledging nothing. Tests of refused
    /// stores use `call`. Any other answer, or 503s past the retries (about 20 s), fails.
    pub async fn store(&self, key: &str, body: Value) -> anyhow::Result<String> {
        use backon::{ExponentialBuilder, Retryable};
        #[derive(Debug, thiserror::Error)]
        #[error("store answered 503: {0}")]
        struct Unavailable(Value);
        let attempt = || async {
            let (status, v, _) = self
                .call(reqwest::Method::POST, "/v1/entries", Some(key), Some(&body))
                .await?;
            if status == 503 && v["error"]["code"] == "store_unavailable" {
                return Err(anyhow::Error::new(Unavailable(v)));
            }
            anyhow::ensure!(status == 201, "store answered {status}: {v}");
            Ok(v["id"].as_str().context("no id")?.to_owned())
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(14),
            )
            .when(|e| e.is::<Unavailable>())
            .await
    }

    /// DELETE an entry; fails unless it answers 204.
    pub async fn delete_entry(&self, key: &str, id: &str) -> anyhow::Result<()> {
        let (status, v, _) = self
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/entries/{id}"),
                Some(key),
                None,
            )
            .await?;
        anyhow::ensure!(status == 204, "delete of {id} answered {status}: {v}");
        Ok(())
    }

    pub async fn lookup(&self, key: &str, body: Value) -> anyhow::Result<Value> {
        let (status, v, headers) = self
            .call(reqwest::Method::POST, "/v1/lookup", Some(key), Some(&body))
            .await?;
        anyhow::ensure!(status == 200, "lookup answered {status}: {v}");
        let header = headers
            .get("x-semantis-cache")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let hit = v["hit"].as_bool().unwrap_or(false);
        anyhow::ensure!(
            header == if hit { "HIT" } else { "MISS" },
            "header {header} disagrees with {v}"
        );
        Ok(v)
    }

    /// Candidates of team-a (`KEY_A`'s tenant) turned away for `reason`
    /// (`semantis_cache_rejected_candidates_total`).
    pub async fn rejected(&self, reason: &str) -> anyhow::Result<f64> {
        Ok(metric_sum(
            &self.metrics().await?,
            "semantis_cache_rejected_candidates_total",
            &[("tenant", "team-a"), ("reason", reason)],
        ))
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.metrics_url))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Poll `check` until it returns true or the deadline passes.
    pub async fn eventually<F, Fut>(
        &self,
        what: &str,
        within: Duration,
        mut check: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let deadline = Instant::now() + within;
        loop {
            if check().await? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what} did not happen within {within:?}\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

fn regex_port(config: &str, port: u16, metrics_port: u16) -> String {
    config
        .lines()
        .map(|l| {
            if l.starts_with("listen = ") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else if l.starts_with("metrics_listen = ") {
                format!("metrics_listen = \"127.0.0.1:{metrics_port}\"")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A unit vector along axis `i` with a small tilt `t` towards axis `i+1`.
pub fn axis(dim: usize, i: usize, tilt: f32) -> Vec<f32> {
    let mut v = vec![0.0; dim];
    v[i % dim] = 1.0;
    v[(i + 1) % dim] = tilt;
    v
}

/// A deterministic pseudo-random vector (splitmix64), distinct for every `i`.
pub fn scattered(dim: u64, i: u64) -> Vec<f32> {
    (0..dim)
        .map(|d| {
            let mut z = (i * dim + d).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) as f64 / u64::MAX as f64) as f32 - 0.5
        })
        .collect()
}

pub fn answer(text: &str) -> Value {
    json!({"choices": [{"message": {"role": "assistant", "content": text}}]})
}

/// A sum of one metric's samples whose label set contains every `labels` pair.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Serves a fake third-party API on a free loopback port: each `(path, protocol)` route posts
/// its JSON body, with the request's headers and the shared `state`, to `handler`, told which
/// protocol the path speaks. Returns the base URL; the server lives as long as the runtime.
pub async fn serve_fake<S, F, Fut>(
    state: S,
    routes: &[(&'static str, &'static str)],
    handler: F,
) -> anyhow::Result<String>
where
    S: Clone + Send + Sync + 'static,
    F: Fn(S, &'static str, axum::http::HeaderMap, Value) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = axum::response::Response> + Send + 'static,
{
    use axum::extract::State;
    let mut app = axum::Router::new();
    for &(path, protocol) in routes {
        let handler = handler.clone();
        app = app.route(
            path,
            axum::routing::post(
                move |State(s): State<S>,
                      headers: axum::http::HeaderMap,
                      axum::Json(body): axum::Json<Value>| {
                    handler(s, protocol, headers, body)
                },
            ),
        );
    }
    let app = app.with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("failed to bind the fake server")?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

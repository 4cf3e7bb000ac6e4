//! Issue 17: the operator and its caches as real pods. A second loopback cluster whose only
//! node is real (`e2e/scripts/node.sh`: containerd, runc, CNI, kubelet, kube-proxy, CoreDNS),
//! running images built from the project's Dockerfiles (`e2e/scripts/images.sh`). The operator
//! is installed the way users install it (helm, kustomize) and runs as a pod under exactly the
//! RBAC those install; the tests talk to the caches through their Services' cluster IPs (this
//! machine is the node, so kube-proxy's rules route them) and to pods with `kubectl exec`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::{Value, json};

use super::harness::{RealNode, provision_volumes_for, serial};

/// Pods on a real node start in seconds, but a debug-built dataplane loads its model first.
const NODE_DEADLINE: Duration = Duration::from_secs(300);
const NODE_NAME: &str = "semantis-node";
const IMAGES: &str = "localhost/semantis";
const CRD: &str = "semanticcaches.semantis.dev";

/// The real-node cluster: `SEMANTIS_NODE_KUBECONFIG` when set (attach; `make test` starts it),
/// else `node.sh start` for this process.
struct Cluster {
    kubeconfig: PathBuf,
    /// kubectl and helm, built with the control plane.
    bin: PathBuf,
    volumes: PathBuf,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let kubeconfig = match std::env::var("SEMANTIS_NODE_KUBECONFIG") {
            Ok(p) => PathBuf::from(p),
            Err(_) => {
                let out = Command::new("bash")
                    .arg(super::harness::repo_root().join("e2e/scripts/node.sh"))
                    .arg("start")
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .expect("node.sh runs");
                assert!(out.status.success(), "node.sh start failed");
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                PathBuf::from(
                    text.lines()
                        .find_map(|l| l.strip_prefix("KUBECONFIG="))
                        .expect("node.sh prints KUBECONFIG="),
                )
            }
        };
        let dir = kubeconfig.parent().expect("the kubeconfig has a directory");
        let env = std::fs::read_to_string(dir.join("env")).expect("the cluster's env file");
        let bin = env
            .lines()
            .find_map(|l| l.strip_prefix("SEMANTIS_E2E_BIN="))
            .map(PathBuf::from)
            .expect("the env file names the control plane's bin directory");
        Cluster {
            volumes: dir.join("volumes"),
            kubeconfig,
            bin,
        }
    })
}

async fn client() -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(&cluster().kubeconfig)
        .context("failed to read the node cluster's kubeconfig")?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("failed to load the node cluster's kubeconfig")?;
    Ok(Client::try_from(config)?)
}

/// The volume provisioner for the node cluster, on its own thread for the life of the process.
fn provisioner() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let volumes = cluster().volumes.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let node = RealNode {
                    name: NODE_NAME.to_owned(),
                    volumes,
                };
                let result = match client().await {
                    Ok(c) => provision_volumes_for(c, Some(node)).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    eprintln!("node volume provisioner stopped: {e:#}");
                }
            });
        });
    });
}

fn tool(name: &str, args: &[&str]) -> anyhow::Result<String> {
    let bin = cluster().bin.join(name);
    let out = Command::new(&bin)
        .args(args)
        .current_dir(super::harness::repo_root())
        .env("KUBECONFIG", &cluster().kubeconfig)
        .output()
        .with_context(|| format!("failed to run {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{name} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    tool("kubectl", args)
}

fn helm(args: &[&str]) -> anyhow::Result<String> {
    tool("helm", args)
}

/// A test's world on the node cluster: a namespace for the operator and one for the caches,
/// both deleted at the end (with the pods in them) once the test calls `passed`; a failed
/// test leaves them for `kubectl` to look at (the next `node.sh start` wipes the cluster).
struct NodeWorld {
    client: Client,
    ns: String,
    operator_ns: String,
    passed: bool,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl NodeWorld {
    async fn new(test: &str) -> anyhow::Result<Self> {
        let guard = serial().await;
        provisioner();
        let client = client().await?;
        let ns = super::harness::World::namespace(&client, test).await?;
        let operator_ns = format!("{ns}-operator");
        let api: Api<Namespace> = Api::all(client.clone());
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": operator_ns } }))?,
        )
        .await
        .with_context(|| format!("failed to create namespace {operator_ns}"))?;
        Ok(Self {
            client,
            ns,
            operator_ns,
            passed: false,
            _serial: guard,
        })
    }

    async fn api_key(&self, name: &str) -> anyhow::Result<String> {
        let key = format!("key-{}-{}", self.ns, std::process::id());
        let secret: Secret = serde_json::from_value(json!({
            "metadata": { "name": name },
            "stringData": { "api-key": key },
        }))?;
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &secret)
            .await
            .with_context(|| format!("failed to create Secret {name}"))?;
        Ok(key)
    }

    /// Deletes the caches' namespace and waits until it is gone: the operator must still run
    /// to lift its finalizers.
    fn delete_caches(&self) -> anyhow::Result<()> {
        kubectl(&[
            "delete",
            "namespace",
            &self.ns,
            "--wait=true",
            &format!("--timeout={}s", NODE_DEADLINE.as_secs()),
        ])
        .map(drop)
    }

    /// The end of a passing helm test: the caches go while the operator still lifts their
    /// finalizers, then the release, then the CRD the chart keeps (the next release must be
    /// able to own it).
    fn uninstall_helm(&mut self) -> anyhow::Result<()> {
        self.delete_caches()?;
        helm(&[
            "uninstall",
            "semantis",
            "--namespace",
            &self.operator_ns,
            "--wait",
        ])?;
        kubectl(&["delete", "crd", CRD])?;
        self.passed = true;
        Ok(())
    }

    /// `config/samples`' minimal cache `demo` applied unchanged with its tenant's key, Ready
    /// and answering through its Service: the key and the dataplane.
    async fn minimal_sample(&self) -> anyhow::Result<(String, Dataplane)> {
        let key = self.api_key("team-a-api-key").await?;
        kubectl(&[
            "apply",
            "--namespace",
            &self.ns,
            "-f",
            path_str(&sample("minimal"))?,
        ])?;
        self.wait_ready("demo")?;
        let dp = self.dataplane("demo", &key).await?;
        dp.wait_serving().await?;
        Ok((key, dp))
    }

    /// `kubectl wait --for=condition=Ready semanticcache/NAME`, as a user would.
    fn wait_ready(&self, cache: &str) -> anyhow::Result<()> {
        kubectl(&[
            "wait",
            "--namespace",
            &self.ns,
            "--for=condition=Ready",
            &format!("semanticcache/{cache}"),
            &format!("--timeout={}s", NODE_DEADLINE.as_secs()),
        ])
        .map(drop)
    }

    /// The cache's dataplane through its Service's cluster IP.
    async fn dataplane(&self, cache: &str, key: &str) -> anyhow::Result<Dataplane> {
        let svc = Api::<Service>::namespaced(self.client.clone(), &self.ns)
            .get(&format!("{cache}-dataplane"))
            .await
            .context("failed to read the dataplane Service")?;
        let ip = svc
            .spec
            .and_then(|s| s.cluster_ip)
            .ok_or_else(|| anyhow!("the dataplane Service has no cluster IP"))?;
        Ok(Dataplane {
            base: format!("http://{ip}:8080"),
            key: key.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }

    /// (name, uid) of the ready, not deleted pods of one component of a cache.
    async fn ready_pods(
        &self,
        cache: &str,
        component: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().labels(&format!(
                "app.kubernetes.io/instance={cache},app.kubernetes.io/component={component}"
            )))
            .await?;
        Ok(pods
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
            .collect())
    }

    /// Deletes a ready pod of the component and waits until another pod (for a StatefulSet:
    /// the same name, a new uid) is ready. Returns the new pod's name.
    async fn replace_pod(&self, cache: &str, component: &str) -> anyhow::Result<String> {
        let (old, old_uid) = self
            .ready_pods(cache, component)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no ready {component} pod to delete"))?;
        Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .delete(&old, &DeleteParams::default())
            .await
            .with_context(|| format!("failed to delete pod {old}"))?;
        let started = Instant::now();
        loop {
            let now = self.ready_pods(cache, component).await?;
            if let Some((name, _)) = now.into_iter().find(|(_, uid)| *uid != old_uid) {
                return Ok(name);
            }
            if started.elapsed() > NODE_DEADLINE {
                bail!("no {component} pod became ready after {old} was deleted");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for NodeWorld {
    fn drop(&mut self) {
        if !self.passed {
            eprintln!(
                "kept namespaces {} and {} of the failed test (KUBECONFIG={})",
                self.ns,
                self.operator_ns,
                cluster().kubeconfig.display()
            );
            // What the pods said, for the CI log (the node's next start removes them).
            for args in [
                vec![
                    "get",
                    "pods,endpointslices",
                    "-o",
                    "wide",
                    "--namespace",
                    &self.ns,
                ],
                vec![
                    "logs",
                    "--namespace",
                    &self.ns,
                    "--all-containers",
                    "--prefix",
                    "--tail=40",
                    "-l",
                    "app.kubernetes.io/component=dataplane",
                ],
            ] {
                match kubectl(&args) {
                    Ok(out) => eprintln!("kubectl {}:\n{out}", args.join(" ")),
                    Err(e) => eprintln!("{e:#}"),
                }
            }
            return;
        }
        for ns in [&self.ns, &self.operator_ns] {
            let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);
        }
    }
}

struct Dataplane {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Dataplane {
    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .with_context(|| format!("failed to POST {path}"))?;
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Waits until the Service answers an authenticated request: kube-proxy programs the
    /// endpoint a moment after the pod turns ready.
    async fn wait_serving(&self) -> anyhow::Result<()> {
        // A client of its own with no kept-alive connections: every probe takes the Service's
        // current route, not a connection pooled to a pod that is gone.
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(0)
            .build()?;
        let started = Instant::now();
        loop {
            let last = match probe
                .get(format!("{}/v1/stats", self.base))
                .bearer_auth(&self.key)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() > NODE_DEADLINE {
                bail!(
                    "the dataplane at {} did not answer; last: {last}",
                    self.base
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the dataplane's metrics say at least `n` entries were flushed into LanceDB
    /// (`semantis_store_flushed_entries_total`, on the Service's metrics port).
    async fn wait_flushed(&self, n: usize) -> anyhow::Result<()> {
        self.wait_metric("semantis_store_flushed_entries_total", |v| v >= n as f64)
            .await
            .map(drop)
    }

    /// Waits until the sum of metric `name`'s series on the Service's metrics port is a value
    /// `wanted` accepts, and returns it. Each read takes the Service's current route (no
    /// pooled connection to a pod that is gone).
    async fn wait_metric(&self, name: &str, wanted: impl Fn(f64) -> bool) -> anyhow::Result<f64> {
        let url = format!("{}/metrics", self.base.replace(":8080", ":9464"));
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(0)
            .build()?;
        let started = Instant::now();
        loop {
            let read = match probe.get(&url).send().await {
                Ok(r) => Some(
                    r.text()
                        .await
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| {
                            l.strip_prefix(name)
                                .is_some_and(|rest| rest.starts_with([' ', '{']))
                        })
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum(),
                ),
                Err(_) => None,
            };
            if let Some(v) = read.filter(|&v| wanted(v)) {
                return Ok(v);
            }
            if started.elapsed() > NODE_DEADLINE {
                bail!("{name} read {read:?} at {url} until the deadline");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the Service answers from index version `fingerprint` (`/v1/stats`): the
    /// old version retired from serving.
    async fn wait_index(&self, fingerprint: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut seen = Value::Null;
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/v1/stats", self.base))
                .bearer_auth(&self.key)
                .send()
                .await
            {
                seen = r.json::<Value>().await.unwrap_or(Value::Null);
                if seen["index_version"] == json!(fingerprint) {
                    return Ok(());
                }
            }
            if started.elapsed() > NODE_DEADLINE {
                bail!("the dataplane does not serve index {fingerprint}: {seen}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn store(&self, prompt: &str, answer: &str) -> anyhow::Result<String> {
        let (status, body) = self
            .post(
                "/v1/entries",
                &json!({
                    "prompt": prompt,
                    "response": { "choices": [{ "message": { "role": "assistant", "content": answer } }] },
                    "scope": { "model": "gpt-4o-mini" }
                }),
            )
            .await?;
        ensure!(
            status == 200 || status == 201,
            "store answered {status}: {body}"
        );
        body["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("store answered without an id: {body}"))
    }

    async fn lookup(&self, prompt: &str) -> anyhow::Result<Value> {
        let (status, body) = self
            .post(
                "/v1/lookup",
                &json!({ "prompt": prompt, "scope": { "model": "gpt-4o-mini" } }),
            )
            .await?;
        ensure!(status == 200, "lookup answered {status}: {body}");
        Ok(body)
    }

    /// Fails unless a lookup of each exact prompt serves its answer; `when` says after what.
    async fn ensure_served(&self, entries: &[(String, String)], when: &str) -> anyhow::Result<()> {
        let served = self.served(entries).await?;
        ensure!(
            served == entries.len(),
            "{when}: {served} of {} acknowledged entries were served",
            entries.len()
        );
        Ok(())
    }

    /// How many of `entries` (prompt, answer) a lookup of the exact prompt serves with that answer.
    async fn served(&self, entries: &[(String, String)]) -> anyhow::Result<usize> {
        let mut n = 0;
        for (prompt, answer) in entries {
            let body = self.lookup(prompt).await?;
            if body["hit"] == json!(true)
                && body["response"]["choices"][0]["message"]["content"] == json!(answer)
            {
                n += 1;
            }
        }
        Ok(n)
    }
}

fn image_values() -> Vec<String> {
    vec![
        format!("image.repository={IMAGES}/semantis-operator"),
        "image.tag=e2e".to_owned(),
        format!("dataplaneImage.repository={IMAGES}/semantis-dataplane"),
        "dataplaneImage.tag=e2e".to_owned(),
        format!("redisImage.repository={IMAGES}/redis"),
        "redisImage.tag=e2e".to_owned(),
    ]
}

fn sample(name: &str) -> PathBuf {
    super::harness::repo_root()
        .join("config/samples")
        .join(format!("semantis_v1alpha1_semanticcache_{name}.yaml"))
}

fn entries(n: usize, tag: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("In the {tag} runbook, what is step {i} of restoring service area {i}?"),
                format!("{tag} answer {i}"),
            )
        })
        .collect()
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

fn helm_install(w: &NodeWorld, chart: &str, verb: &str) -> anyhow::Result<()> {
    if verb == "install" {
        // A failed test keeps its namespaces and so the chart's CRD, which another release
        // cannot adopt: remove it (its caches go with it) so one failure stays one failure.
        kubectl(&[
            "delete",
            "crd",
            CRD,
            "--ignore-not-found",
            &format!("--timeout={}s", NODE_DEADLINE.as_secs()),
        ])?;
    }
    let mut args = vec![
        verb.to_owned(),
        "semantis".to_owned(),
        chart.to_owned(),
        "--namespace".to_owned(),
        w.operator_ns.clone(),
        "--wait".to_owned(),
        format!("--timeout={}s", NODE_DEADLINE.as_secs()),
    ];
    for v in image_values() {
        args.push("--set".to_owned());
        args.push(v);
    }
    helm(&args.iter().map(String::as_str).collect::<Vec<_>>()).map(drop)
}

#[tokio::test]
async fn helm_installed_operator_runs_the_minimal_sample_on_real_pods() -> anyhow::Result<()> {
    let mut w = NodeWorld::new("real-helm").await?;
    helm_install(&w, "charts/semantis-operator", "install")?;

    // The minimal sample, unchanged: a user's first manifest.
    let (_, dp) = w.minimal_sample().await?;

    // Redis runs the operator's configuration: the append-only file is on.
    let aof = kubectl(&[
        "exec",
        "--namespace",
        &w.ns,
        "demo-redis-0",
        "-c",
        "redis",
        "--",
        "sh",
        "-c",
        "redis-cli --no-auth-warning -a \"$REDIS_PASSWORD\" CONFIG GET appendonly",
    ])?;
    ensure!(
        aof.split_whitespace().collect::<Vec<_>>() == ["appendonly", "yes"],
        "Redis runs without AOF: {aof}"
    );

    let stored = entries(12, "helm");
    for (prompt, answer) in &stored {
        dp.store(prompt, answer).await?;
    }
    dp.ensure_served(&stored, "right after the stores").await?;
    dp.store(
        "How do I rotate the database password?",
        "Run the rotate-credentials job.",
    )
    .await?;
    let hit = dp.lookup("How can I rotate the database password?").await?;
    ensure!(
        hit["hit"] == json!(true) && hit["path"] == json!("semantic"),
        "a paraphrase was not a semantic hit: {hit}"
    );

    // Acknowledged stores survive the dataplane pod's deletion ...
    let more = entries(8, "after-ack");
    for (prompt, answer) in &more {
        dp.store(prompt, answer).await?;
    }
    let all: Vec<_> = stored.iter().chain(&more).cloned().collect();
    w.replace_pod("demo", "dataplane").await?;
    dp.wait_serving().await?;
    dp.ensure_served(&all, "after the dataplane pod was replaced")
        .await?;

    // ... and the Redis pod's.
    let last = entries(8, "before-redis-restart");
    for (prompt, answer) in &last {
        dp.store(prompt, answer).await?;
    }
    let all: Vec<_> = all.iter().chain(&last).cloned().collect();
    w.replace_pod("demo", "redis").await?;
    dp.ensure_served(&all, "after the Redis pod was replaced")
        .await?;

    // The dataplane's model kernels run on the CPUs its pod has: all of this machine's
    // without a limit, one with `limits.cpu: 1` (its cgroup's quota; candle alone counts the
    // node's cores whatever the quota, and spun a thread per core on the one CPU it had).
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    dp.wait_metric("semantis_model_threads", |v| v == cpus)
        .await?;
    kubectl(&[
        "patch",
        "semanticcache",
        "demo",
        "--namespace",
        &w.ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"dataplane":{"resources":{"limits":{"cpu":"1"}}}}}"#,
    ])?;
    dp.wait_metric("semantis_model_threads", |v| v == 1.0)
        .await?;
    dp.wait_serving().await?;
    dp.ensure_served(&all, "after the dataplane was limited to one CPU")
        .await?;

    w.uninstall_helm()
}

/// The pod holding the operator's leader Lease.
async fn leader(w: &NodeWorld, ns: &str) -> anyhow::Result<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(w.client.clone(), ns);
    let started = Instant::now();
    loop {
        if let Some(holder) = leases
            .get_opt("semantis-operator")
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
        {
            return Ok(holder);
        }
        if started.elapsed() > NODE_DEADLINE {
            bail!("no operator pod took the leader Lease in {ns}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn kustomize_installed_operator_pods_hand_over_leadership_and_keep_reconciling()
-> anyhow::Result<()> {
    let mut w = NodeWorld::new("real-kustomize").await?;
    // A user's overlay of config/default: local images and two replicas (one leads).
    let overlay = tempfile::tempdir()?;
    let root = super::harness::repo_root();
    // kustomize takes only relative paths to a base: climb to / from the overlay.
    let base = format!(
        "{}{}",
        "../".repeat(overlay.path().components().count() - 1),
        path_str(&root.join("config/default"))?.trim_start_matches('/')
    );
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\n\
             kind: Kustomization\n\
             resources:\n  - {base}\n\
             images:\n  - name: ghcr.io/semantis/semantis-operator\n    newName: {IMAGES}/semantis-operator\n    newTag: e2e\n\
             replicas:\n  - name: semantis-operator\n    count: 2\n\
             patches:\n  - target: {{kind: Deployment, name: semantis-operator}}\n    patch: |-\n\
             \x20     - {{op: replace, path: /spec/template/spec/containers/0/env/2/value, value: {IMAGES}/semantis-dataplane:e2e}}\n\
             \x20     - {{op: replace, path: /spec/template/spec/containers/0/env/3/value, value: {IMAGES}/redis:e2e}}\n",
            base = base,
        ),
    )?;
    let overlay_dir = path_str(overlay.path())?.to_owned();
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        &overlay_dir,
    ])?;
    kubectl(&[
        "rollout",
        "status",
        "--namespace",
        "semantis-system",
        "deployment/semantis-operator",
        &format!("--timeout={}s", NODE_DEADLINE.as_secs()),
    ])?;

    let (key, dp) = w.minimal_sample().await?;
    let stored = entries(5, "kustomize");
    for (prompt, answer) in &stored {
        dp.store(prompt, answer).await?;
    }

    // Kill the leader; the standby takes the Lease and reconciles the next change.
    let first = leader(&w, "semantis-system").await?;
    Api::<Pod>::namespaced(w.client.clone(), "semantis-system")
        .delete(&first, &DeleteParams::default().grace_period(0))
        .await
        .with_context(|| format!("failed to delete the leader {first}"))?;
    let started = Instant::now();
    let second = loop {
        let now = leader(&w, "semantis-system").await?;
        if now != first {
            break now;
        }
        ensure!(
            started.elapsed() < NODE_DEADLINE,
            "nobody took over from {first}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("leader {first} deleted; {second} leads");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "team-b-api-key" },
        "stringData": { "api-key": format!("{key}-b") },
    }))?;
    Api::<Secret>::namespaced(w.client.clone(), &w.ns)
        .create(&PostParams::default(), &secret)
        .await?;
    kubectl(&[
        "patch",
        "--namespace",
        &w.ns,
        "semanticcache/demo",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/tenants/-","value":{"name":"team-b","apiKeySecret":{"name":"team-b-api-key","key":"api-key"}}}]"#,
    ])?;
    w.wait_ready("demo")?;
    let generation = kubectl(&[
        "get",
        "--namespace",
        &w.ns,
        "semanticcache/demo",
        "-o",
        "jsonpath={.metadata.generation} {.status.observedGeneration}",
    ])?;
    let parts: Vec<_> = generation.split_whitespace().collect();
    ensure!(
        parts.len() == 2 && parts[0] == parts[1] && parts[0] != "1",
        "the new leader did not reconcile the change: generation/observed = {generation}"
    );
    dp.wait_serving().await?;
    dp.ensure_served(&stored, "across the leader hand-over")
        .await?;

    // Clean up what kustomize installed, the CRD too, once the operator has let the caches go.
    w.delete_caches()?;
    kubectl(&[
        "delete",
        "-k",
        &overlay_dir,
        "--ignore-not-found",
        "--wait=false",
    ])?;
    w.passed = true;
    Ok(())
}

#[tokio::test]
async fn helm_upgrade_brings_the_crd_s_new_fields() -> anyhow::Result<()> {
    let mut w = NodeWorld::new("real-upgrade").await?;
    let root = super::harness::repo_root();
    // The chart as released, then the same chart one version on, whose CRD gained a field.
    let next = tempfile::tempdir()?;
    let chart = next.path().join("semantis-operator");
    let copied = Command::new("cp")
        .arg("-R")
        .arg(root.join("charts/semantis-operator"))
        .arg(&chart)
        .status()?;
    ensure!(copied.success(), "failed to copy the chart");
    let crd_path = chart.join("files/crds/semanticcaches.semantis.dev.yaml");
    let mut crd: Value = serde_yaml::from_str(&std::fs::read_to_string(&crd_path)?)?;
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["e2eUpgradeProbe"] =
        json!({ "type": "string", "description": "Added by the next chart." });
    std::fs::write(&crd_path, serde_yaml::to_string(&crd)?)?;
    let meta_path = chart.join("Chart.yaml");
    let meta = std::fs::read_to_string(&meta_path)?.replace("\nversion: 0.1.0", "\nversion: 0.1.1");
    std::fs::write(&meta_path, meta)?;

    helm_install(&w, "charts/semantis-operator", "install")?;
    let manifest = format!(
        "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata:\n  name: probe\n  namespace: {}\n\
         spec:\n  e2eUpgradeProbe: upgraded\n  embedding: {{provider: local, dimension: 384}}\n\
         \x20 tenants:\n    - name: team-a\n      apiKeySecret: {{name: team-a-api-key, key: api-key}}\n",
        w.ns
    );
    let file = next.path().join("probe.yaml");
    std::fs::write(&file, manifest)?;
    let before = kubectl(&["apply", "--server-side", "-f", path_str(&file)?]);
    ensure!(
        before
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("e2eUpgradeProbe")),
        "the released CRD accepted a field it does not have: {before:?}"
    );

    helm_install(&w, path_str(&chart)?, "upgrade")?;
    kubectl(&["apply", "--server-side", "-f", path_str(&file)?])?;
    let kept = kubectl(&[
        "get",
        "--namespace",
        &w.ns,
        "semanticcache/probe",
        "-o",
        "jsonpath={.spec.e2eUpgradeProbe}",
    ])?;
    ensure!(
        kept == "upgraded",
        "the upgraded CRD pruned the new field: {kept:?}"
    );

    w.delete_caches()?;
    helm(&[
        "uninstall",
        "semantis",
        "--namespace",
        &w.operator_ns,
        "--wait",
    ])?;
    let crd_left = kubectl(&["get", "crd", CRD, "-o", "name"])?;
    ensure!(
        crd_left.trim() == format!("customresourcedefinition.apiextensions.k8s.io/{CRD}"),
        "helm uninstall removed the CRD (and would have removed every cache)"
    );
    kubectl(&["delete", "crd", CRD])?;
    w.passed = true;
    Ok(())
}

/// A MinIO server on the node's bridge address, where pods reach the host
/// (`scripts/services.sh minio node 10.244.0.1`), with a fresh bucket.
struct Minio {
    endpoint: String,
    user: String,
    password: String,
    bucket: String,
    client: aws_sdk_s3::Client,
}

impl Minio {
    async fn start() -> anyhow::Result<Self> {
        let out = Command::new("bash")
            .arg(super::harness::repo_root().join("scripts/services.sh"))
            .args(["minio", "node", "10.244.0.1"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("failed to run services.sh minio")?;
        ensure!(out.status.success(), "services.sh minio node failed");
        let text = String::from_utf8(out.stdout)?;
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("services.sh did not print {k}"))
        };
        let (endpoint, user, password) = (
            get("SEMANTIS_TEST_S3_ENDPOINT")?,
            get("AWS_ACCESS_KEY_ID")?,
            get("AWS_SECRET_ACCESS_KEY")?,
        );
        let creds =
            aws_sdk_s3::config::Credentials::new(&user, &password, None, None, "semantis-e2e");
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version_latest()
            .endpoint_url(&endpoint)
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .force_path_style(true)
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build();
        let client = aws_sdk_s3::Client::from_conf(conf);
        let bucket = format!("e2e-node-{}", std::process::id());
        client
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .with_context(|| format!("failed to create bucket {bucket}"))?;
        Ok(Self {
            endpoint,
            user,
            password,
            bucket,
            client,
        })
    }

    async fn keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.context("failed to list the bucket")?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        Ok(keys)
    }
}

#[tokio::test]
async fn a_backup_job_lands_in_minio_and_a_new_cache_bootstraps_from_it() -> anyhow::Result<()> {
    let mut w = NodeWorld::new("real-backup").await?;
    let s3 = Minio::start().await?;
    helm_install(&w, "charts/semantis-operator", "install")?;
    let key = w.api_key("team-a-api-key").await?;
    let creds: Secret = serde_json::from_value(json!({
        "metadata": { "name": "s3" },
        "stringData": { "AWS_ACCESS_KEY_ID": s3.user, "AWS_SECRET_ACCESS_KEY": s3.password },
    }))?;
    Api::<Secret>::namespaced(w.client.clone(), &w.ns)
        .create(&PostParams::default(), &creds)
        .await?;
    let manifest = format!(
        "{}  backup:\n    schedule: \"0 3 * * *\"\n    s3: {{bucket: {}, endpoint: \"{}\"}}\n    credentialsSecret: {{name: s3}}\n",
        std::fs::read_to_string(sample("minimal"))?,
        s3.bucket,
        s3.endpoint
    );
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), manifest)?;
    kubectl(&["apply", "--namespace", &w.ns, "-f", path_str(file.path())?])?;
    w.wait_ready("demo")?;
    let dp = w.dataplane("demo", &key).await?;
    dp.wait_serving().await?;
    let stored = entries(6, "backup");
    for (prompt, answer) in &stored {
        dp.store(prompt, answer).await?;
    }

    // A backup holds what was flushed into LanceDB; wait until the dataplane says all of it is.
    dp.wait_flushed(stored.len()).await?;

    // What an operator does before a risky change: run the schedule's Job now.
    kubectl(&[
        "create",
        "job",
        "--namespace",
        &w.ns,
        "--from=cronjob/demo-backup",
        "demo-backup-now",
    ])?;
    kubectl(&[
        "wait",
        "--namespace",
        &w.ns,
        "--for=condition=Complete",
        "job/demo-backup-now",
        &format!("--timeout={}s", NODE_DEADLINE.as_secs()),
    ])?;
    let prefix = format!("{}/demo/", w.ns);
    let keys = s3.keys(&prefix).await?;
    // A complete backup: its manifest (uploaded last) and the metadata export.
    for file in ["manifest.json", "metadata.json"] {
        ensure!(
            keys.iter().any(|k| k.ends_with(&format!("/{file}"))),
            "the backup Job completed but s3://{}/{prefix} has no {file}: {keys:?}",
            s3.bucket
        );
    }

    // A new cache bootstrapped from that backup answers the same lookups.
    let restored = format!(
        "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata: {{name: restored}}\nspec:\n\
         \x20 embedding: {{provider: local, dimension: 384}}\n\
         \x20 tenants:\n    - {{name: team-a, apiKeySecret: {{name: team-a-api-key, key: api-key}}}}\n\
         \x20 bootstrap:\n    backup:\n      s3: {{bucket: {}, prefix: {prefix}, endpoint: \"{}\"}}\n      credentialsSecret: {{name: s3}}\n",
        s3.bucket,
        s3.endpoint,
        prefix = prefix.trim_end_matches('/'),
    );
    std::fs::write(file.path(), restored)?;
    kubectl(&["apply", "--namespace", &w.ns, "-f", path_str(file.path())?])?;
    w.wait_ready("restored")?;
    let copy = w.dataplane("restored", &key).await?;
    copy.wait_serving().await?;
    copy.ensure_served(&stored, "in the bootstrapped cache")
        .await?;

    w.uninstall_helm()
}

/// An OpenAI-compatible embeddings service (`POST /v1/embeddings`), the third-party SaaS the
/// real node's pods call, on the node's bridge address. Vectors hash character trigrams; a
/// request's `dimensions` shortens them, as text-embedding-3 models do, and without it the
/// model's native length (`fake-emb-<n>`) applies.
async fn fake_openai() -> anyhow::Result<String> {
    use axum::Json;
    use axum::routing::post;
    async fn embeddings(Json(body): Json<Value>) -> (axum::http::StatusCode, Json<Value>) {
        let native = body["model"]
            .as_str()
            .and_then(|m| m.strip_prefix("fake-emb-"))
            .and_then(|d| d.parse::<usize>().ok());
        let Some(dim) = body["dimensions"].as_u64().map(|d| d as usize).or(native) else {
            let error =
                json!({ "error": { "message": "unknown model", "type": "invalid_request_error" } });
            return (axum::http::StatusCode::NOT_FOUND, Json(error));
        };
        let texts: Vec<String> = match &body["input"] {
            Value::String(s) => vec![s.clone()],
            v => serde_json::from_value(v.clone()).unwrap_or_default(),
        };
        let data: Vec<Value> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut v = vec![0f32; dim];
                let chars: Vec<char> = t.to_lowercase().chars().collect();
                for w in chars.windows(3) {
                    let h = w.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, c| {
                        (h ^ u64::from(*c)).wrapping_mul(0x0100_0000_01b3)
                    });
                    v[(h % dim as u64) as usize] += 1.0;
                }
                json!({ "object": "embedding", "index": i, "embedding": v })
            })
            .collect();
        let usage = json!({ "prompt_tokens": 1, "total_tokens": 1 });
        (
            axum::http::StatusCode::OK,
            Json(json!({ "object": "list", "data": data, "model": body["model"], "usage": usage })),
        )
    }
    let app = axum::Router::new().route("/v1/embeddings", post(embeddings));
    let listener = tokio::net::TcpListener::bind("10.244.0.1:0")
        .await
        .context("failed to listen on the node's bridge address")?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

/// What a load run saw: acknowledged stores (prompt, answer), requests, failed requests and
/// what each failure said.
type LoadReport = (Vec<(String, String)>, u64, u64, Vec<String>);

/// Stores and lookups through the Service while something else happens: every failed request
/// is counted, every acknowledged store remembered.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<LoadReport>,
}

impl Load {
    fn start(dp: Dataplane, tag: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let tag = tag.to_owned();
        let task = tokio::spawn(async move {
            let (mut acked, mut requests, mut failed, mut errors) =
                (Vec::new(), 0u64, 0u64, Vec::new());
            let mut i = 0usize;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let (prompt, answer) = (
                    format!("{tag} load question {i}: how is item {i} configured?"),
                    format!("{tag} load answer {i}"),
                );
                requests += 1;
                match dp.store(&prompt, &answer).await {
                    Ok(_) => acked.push((prompt, answer)),
                    Err(e) => {
                        failed += 1;
                        errors.push(format!("store {i}: {e:#}"));
                    }
                }
                if let Some((p, _)) = acked.get(i.wrapping_mul(7919) % acked.len().max(1)) {
                    requests += 1;
                    if let Err(e) = dp.lookup(p).await {
                        failed += 1;
                        errors.push(format!("lookup after {i}: {e:#}"));
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, requests, failed, errors)
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<LoadReport> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// The cache's status as `kubectl` prints it: (generation, observedGeneration, active
/// fingerprint, active dimension, target fingerprint or "").
fn index_status(ns: &str, cache: &str) -> anyhow::Result<Vec<String>> {
    let out = kubectl(&[
        "get",
        "--namespace",
        ns,
        &format!("semanticcache/{cache}"),
        "-o",
        "jsonpath={.metadata.generation}|{.status.observedGeneration}|{.status.activeIndex.fingerprint}|{.status.activeIndex.dimension}|{.status.targetIndex.fingerprint}",
    ])?;
    Ok(out.split('|').map(str::to_owned).collect())
}

/// Waits until the cache serves `dimension` from a finished migration: no target index, Ready
/// at the current generation.
async fn wait_migrated(w: &NodeWorld, cache: &str, dimension: u32) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let s = index_status(&w.ns, cache)?;
        if s.len() == 5 && s[0] == s[1] && s[3] == dimension.to_string() && s[4].is_empty() {
            w.wait_ready(cache)?;
            return Ok(s[2].clone());
        }
        if started.elapsed() > NODE_DEADLINE {
            bail!("the migration to {dimension} dimensions did not finish: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits for the migration to `dimension` to finish, stops the load and checks what a user
/// would: a new index version serves, no request failed, every acknowledged entry (`stored`
/// plus the load's) is served. Returns the new fingerprint and every entry.
async fn finish_migration(
    w: &NodeWorld,
    dp: &Dataplane,
    load: Load,
    dimension: u32,
    previous: &str,
    stored: Vec<(String, String)>,
    what: &str,
) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let fingerprint = wait_migrated(w, "demo", dimension).await?;
    let (acked, requests, failed, errors) = load.finish().await?;
    eprintln!(
        "{what}: {requests} requests, {failed} failed, {} stores acknowledged",
        acked.len()
    );
    ensure!(
        fingerprint != previous,
        "{what}: the active index did not change"
    );
    dp.wait_index(&fingerprint).await?;
    let all: Vec<_> = stored.into_iter().chain(acked).collect();
    dp.ensure_served(&all, &format!("after {what}")).await?;
    ensure!(
        failed == 0,
        "{failed} of {requests} requests failed during {what}: {errors:?}"
    );
    Ok((fingerprint, all))
}

#[tokio::test]
async fn model_and_dimension_changes_under_load_lose_nothing_and_survive_an_operator_kill()
-> anyhow::Result<()> {
    let mut w = NodeWorld::new("real-migrate").await?;
    let embeddings = fake_openai().await?;
    helm_install(&w, "charts/semantis-operator", "install")?;
    let key = w.api_key("team-a-api-key").await?;
    let manifest = |embedding: &str| {
        format!(
            "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata: {{name: demo}}\nspec:\n  embedding: {embedding}\n  dataplane: {{storage: {{retiredGraceSeconds: 20}}}}\n  tenants:\n    - {{name: team-a, apiKeySecret: {{name: team-a-api-key, key: api-key}}}}\n"
        )
    };
    let apply = |yaml: String| -> anyhow::Result<()> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), yaml)?;
        kubectl(&["apply", "--namespace", &w.ns, "-f", path_str(file.path())?]).map(drop)
    };
    apply(manifest("{provider: local, dimension: 384}"))?;
    w.wait_ready("demo")?;
    let dp = w.dataplane("demo", &key).await?;
    dp.wait_serving().await?;
    let before = entries(10, "pre-migration");
    for (prompt, answer) in &before {
        dp.store(prompt, answer).await?;
    }
    let local_fp = index_status(&w.ns, "demo")?[2].clone();

    // 1. Another model: the local one to an OpenAI-compatible service, under load.
    let load = Load::start(w.dataplane("demo", &key).await?, "model");
    apply(manifest(&format!(
        "{{provider: openai, model: fake-emb-64, dimension: 64, endpoint: \"{embeddings}\"}}"
    )))?;
    let (openai_fp, all) =
        finish_migration(&w, &dp, load, 64, &local_fp, before, "the model change").await?;

    // 2. Only the dimension, which the provider shortens on request; the operator pod is
    //    killed while the migration runs.
    let load = Load::start(w.dataplane("demo", &key).await?, "dimension");
    apply(manifest(&format!(
        "{{provider: openai, model: fake-emb-64, dimension: 32, sendDimensions: true, endpoint: \"{embeddings}\"}}"
    )))?;
    let started = Instant::now();
    loop {
        let s = index_status(&w.ns, "demo")?;
        if s.len() == 5 && !s[4].is_empty() {
            break;
        }
        ensure!(
            started.elapsed() < NODE_DEADLINE,
            "no migration started: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kubectl(&[
        "delete",
        "pod",
        "--namespace",
        &w.operator_ns,
        "-l",
        "app.kubernetes.io/name=semantis-operator",
        "--grace-period=0",
        "--force",
    ])?;
    finish_migration(&w, &dp, load, 32, &openai_fp, all, "the dimension change").await?;

    // The first model's table is dropped once its grace (20 s) is over.
    wait_table_dropped(&w.ns, &local_fp).await?;
    w.uninstall_helm()
}

/// Waits until a dataplane pod logs that it dropped the table of index version `fingerprint`
/// (`<tenant>--<first 16 hex digits>`), the retired version's grace being over.
async fn wait_table_dropped(ns: &str, fingerprint: &str) -> anyhow::Result<()> {
    let table = format!("team-a--{}", &fingerprint[..fingerprint.len().min(16)]);
    let started = Instant::now();
    loop {
        let logs = kubectl(&[
            "logs",
            "--namespace",
            ns,
            "--all-containers",
            "--tail=-1",
            "-l",
            "app.kubernetes.io/component=dataplane",
        ])
        .unwrap_or_default();
        if logs
            .lines()
            .any(|l| l.contains("deleted the retired index version") && l.contains(&table))
        {
            return Ok(());
        }
        ensure!(
            started.elapsed() < NODE_DEADLINE,
            "no dataplane pod dropped the retired table {table}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

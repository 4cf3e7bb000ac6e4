//! The end-to-end harness: attaches to (or starts) the loopback control plane, installs
//! `crds/`, registers a kwok node, provisions volumes for claims, runs the operator as a
//! process and gives each test its own namespace. Waits are watches or deadline-bounded polls.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    Namespace, Node, PersistentVolume, PersistentVolumeClaim, Secret,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, ResourceExt};
use semantis_operator::crd::SemanticCache;
use serde_json::json;

pub const DEADLINE: Duration = Duration::from_secs(90);

/// The checkout under test. Read at run time: cargo sets `CARGO_MANIFEST_DIR` for the test
/// process, and a test binary reused from a shared target dir may have been built in another
/// checkout, whose path `env!` would have baked in.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The kubeconfig of the control plane: `SEMANTIS_E2E_KUBECONFIG` when set (attach), else the
/// one `e2e/scripts/control-plane.sh start` brings up for this process.
pub fn kubeconfig() -> &'static PathBuf {
    kubeconfig_path()
}

fn kubeconfig_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("SEMANTIS_E2E_KUBECONFIG") {
            return PathBuf::from(p);
        }
        let out = Command::new("bash")
            .arg(repo_root().join("e2e/scripts/control-plane.sh"))
            .arg("start")
            .stderr(Stdio::inherit())
            .output()
            .expect("control-plane.sh runs");
        assert!(out.status.success(), "control-plane.sh start failed");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("KUBECONFIG="))
            .expect("control-plane.sh prints KUBECONFIG=");
        PathBuf::from(line)
    })
}

pub async fn client() -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig_path()).context("failed to read the kubeconfig")?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("failed to load the kubeconfig")?;
    Ok(Client::try_from(config)?)
}

/// One-time cluster setup, on its own thread and runtime (the volume provisioner keeps
/// running there for the life of the test process).
fn setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let result = prepare().await;
                let failed = result.is_err();
                tx.send(result.map_err(|e| format!("{e:#}"))).ok();
                if !failed && let Err(e) = provision_volumes().await {
                    eprintln!("volume provisioner stopped: {e:#}");
                }
            });
        });
        match rx.recv().expect("setup thread reports") {
            Ok(()) => {}
            Err(e) => panic!("failed to prepare the cluster: {e}"),
        }
    });
}

async fn prepare() -> anyhow::Result<()> {
    let client = client().await?;
    install_crd_file(
        &client,
        &repo_root().join("crds/semanticcaches.semantis.dev.yaml"),
    )
    .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "kwok-node-0",
            "annotations": { "kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0" },
            "labels": { "kubernetes.io/hostname": "kwok-node-0", "type": "kwok" }
        }
    }))?;
    nodes
        .patch(
            "kwok-node-0",
            &PatchParams::apply("semantis-e2e").force(),
            &Patch::Apply(&node),
        )
        .await
        .context("failed to register the kwok node")?;
    let ready = |n: Option<&Node>| {
        n.and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    tokio::time::timeout(DEADLINE, await_condition(nodes, "kwok-node-0", ready))
        .await
        .context("the kwok node did not become Ready")??;
    Ok(())
}

pub async fn install_crd_file(client: &Client, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    install_crd(client, crd).await
}

pub async fn install_crd(client: &Client, crd: CustomResourceDefinition) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    api.patch(
        &name,
        &PatchParams::apply("semantis-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .with_context(|| format!("failed to install CRD {name}"))?;
    let established = |c: Option<&CustomResourceDefinition>| {
        c.and_then(|c| c.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    };
    tokio::time::timeout(DEADLINE, await_condition(api, &name, established))
        .await
        .with_context(|| format!("CRD {name} was not established"))??;
    Ok(())
}

/// A stand-in for a storage provisioner: every pending claim gets a pre-bound hostPath volume,
/// so pods with claims schedule onto the kwok node.
async fn provision_volumes() -> anyhow::Result<()> {
    provision_volumes_for(client().await?, None).await
}

/// Where the provisioner puts a claim's volume: a hostPath for kwok, or, on the real node, a
/// `local` volume pinned to that node (what local-path-provisioner and the like create), whose
/// directory is made here, open to the pod's non-root user as theirs are.
pub struct RealNode {
    pub name: String,
    pub volumes: PathBuf,
}

pub async fn provision_volumes_for(client: Client, node: Option<RealNode>) -> anyhow::Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let mut stream = watcher(claims, watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(pvc) = stream.try_next().await? {
        if pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_ref())
            .is_some()
        {
            continue;
        }
        let ns = pvc.namespace().unwrap_or_default();
        let name = format!("e2e-{}-{}", ns, pvc.name_any());
        let spec = pvc.spec.clone().unwrap_or_default();
        let size = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage").cloned())
            .map(|q| q.0)
            .unwrap_or_else(|| "1Gi".into());
        let mut pv = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": { "name": name, "labels": { "semantis-e2e": "provisioned" } },
            "spec": {
                "capacity": { "storage": size },
                "accessModes": spec.access_modes.clone().unwrap_or_default(),
                "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
                "persistentVolumeReclaimPolicy": "Delete",
                "hostPath": { "path": format!("/tmp/semantis-e2e-volumes/{name}") },
                "claimRef": { "namespace": ns, "name": pvc.name_any(), "uid": pvc.uid() }
            }
        });
        if let Some(node) = &node {
            let dir = node.volumes.join(&name);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .with_context(|| format!("failed to open {} to pods", dir.display()))?;
            let spec = &mut pv["spec"];
            spec.as_object_mut().map(|o| o.remove("hostPath"));
            spec["local"] = json!({ "path": dir });
            // Nothing deletes a local volume's files; the node's directory goes with the node.
            spec["persistentVolumeReclaimPolicy"] = json!("Retain");
            spec["nodeAffinity"] = json!({ "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                { "key": "kubernetes.io/hostname", "operator": "In", "values": [node.name] }
            ] }] } });
        }
        let pv: PersistentVolume = serde_json::from_value(pv)?;
        match volumes.create(&PostParams::default(), &pv).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => eprintln!("failed to provision {name}: {e}"),
        }
    }
    Ok(())
}

/// Serialises the tests: one operator per test watches every namespace, so two tests must not
/// run their operators at once.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A test's world: a client and a fresh namespace, deleted at the end.
pub struct World {
    pub client: Client,
    pub ns: String,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl World {
    pub async fn new(test: &str) -> anyhow::Result<Self> {
        let guard = serial().await;
        setup();
        let client = client().await?;
        let ns = Self::namespace(&client, test).await?;
        Ok(Self {
            client,
            ns,
            _serial: guard,
        })
    }

    pub async fn namespace(client: &Client, prefix: &str) -> anyhow::Result<String> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("{prefix}-{}-{n}", std::process::id());
        let api: Api<Namespace> = Api::all(client.clone());
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await
        .with_context(|| format!("failed to create namespace {ns}"))?;
        Ok(ns)
    }

    pub fn caches(&self) -> Api<SemanticCache> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn secret(&self, name: &str, data: &[(&str, &str)]) -> anyhow::Result<()> {
        let string_data: BTreeMap<String, String> = data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let secret: Secret = serde_json::from_value(json!({
            "metadata": { "name": name },
            "stringData": string_data,
        }))?;
        self.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .with_context(|| format!("failed to create Secret {name}"))?;
        Ok(())
    }

    /// Server-side applies a SemanticCache manifest as a GitOps tool would (its own manager).
    pub async fn apply_cache(&self, yaml: &str) -> anyhow::Result<SemanticCache> {
        let mut cache: SemanticCache = serde_yaml::from_str(yaml)?;
        cache.metadata.namespace = Some(self.ns.clone());
        let name = cache.name_any();
        self.caches()
            .patch(
                &name,
                &PatchParams::apply("e2e-gitops").force(),
                &Patch::Apply(&cache),
            )
            .await
            .with_context(|| format!("failed to apply SemanticCache {name}"))
    }

    /// Waits until the cache satisfies `check`, with a deadline; the last state goes into the
    /// error so a failure says what was seen.
    pub async fn wait_cache(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&SemanticCache) -> bool,
    ) -> anyhow::Result<SemanticCache> {
        wait_for(&self.caches(), name, what, check).await
    }

    /// `kubectl wait --for=condition=Ready` that also honours observedGeneration.
    pub async fn wait_ready(&self, name: &str) -> anyhow::Result<SemanticCache> {
        self.wait_cache(name, "Ready=True at the current generation", ready_now)
            .await
    }
}

pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    check: impl Fn(&K) -> bool,
) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let started = Instant::now();
    let mut stream = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects()
    .boxed();
    let mut last = None;
    loop {
        let remaining = DEADLINE
            .checked_sub(started.elapsed())
            .ok_or_else(|| anyhow!("timed out waiting for {name}: {what}; last seen: {last:#?}"))?;
        match tokio::time::timeout(remaining, stream.next()).await {
            Err(_) => bail!("timed out waiting for {name}: {what}; last seen: {last:#?}"),
            Ok(None) => bail!("watch ended while waiting for {name}: {what}"),
            Ok(Some(Err(e))) => eprintln!("watch error while waiting for {name}: {e}"),
            Ok(Some(Ok(obj))) => {
                if check(&obj) {
                    return Ok(obj);
                }
                last = Some(obj);
            }
        }
    }
}

/// Waits until `name` is gone.
pub async fn wait_gone<K>(api: &Api<K>, name: &str) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let gone = await_condition(api.clone(), name, |o: Option<&K>| o.is_none());
    tokio::time::timeout(DEADLINE, gone)
        .await
        .map_err(|_| anyhow!("timed out waiting for {name} to be deleted"))??;
    Ok(())
}

pub fn condition<'a>(
    cache: &'a SemanticCache,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    cache
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// True when `type_` has `status` for the generation the cache is at now.
pub fn condition_now(cache: &SemanticCache, type_: &str, status: &str) -> bool {
    condition(cache, type_)
        .is_some_and(|c| c.status == status && c.observed_generation == cache.metadata.generation)
}

pub fn ready_now(cache: &SemanticCache) -> bool {
    condition_now(cache, "Ready", "True")
        && cache.status.as_ref().and_then(|s| s.observed_generation) == cache.metadata.generation
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn binary(name: &str) -> PathBuf {
    // tests run from target/<profile>/deps; binaries sit one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p {name}`; `make e2e` does)",
        path.display()
    );
    path
}

/// The operator as a process, killed when dropped.
pub struct Operator {
    child: Child,
    pub metrics_url: String,
    pub log: PathBuf,
}

impl Operator {
    pub async fn start(leader_election: bool, lease_namespace: &str) -> anyhow::Result<Self> {
        Self::start_with(leader_election, lease_namespace, &[]).await
    }

    pub async fn start_with(
        leader_election: bool,
        lease_namespace: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("semantis-operator-e2e-{port}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(binary("semantis-operator"))
            .arg("run")
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("--leader-election={leader_election}"))
            .arg("--lease-namespace")
            .arg(lease_namespace)
            .arg("--lease-duration-secs")
            .arg("6")
            .args(extra)
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", "info,kube=warn")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("failed to start semantis-operator")?;
        let mut op = Self {
            child,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            log,
        };
        let started = Instant::now();
        while op.metric("semantis_operator_leader").await.is_none() {
            if let Some(status) = op.child.try_wait()? {
                bail!(
                    "semantis-operator exited ({status}) at start:\n{}",
                    std::fs::read_to_string(&op.log).unwrap_or_default()
                );
            }
            if started.elapsed() > DEADLINE {
                bail!("semantis-operator did not serve metrics within {DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(op)
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(&self.metrics_url)
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .reduce(|a, b| a + b)
    }

    pub async fn wait_metric(
        &self,
        name: &str,
        check: impl Fn(f64) -> bool,
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        loop {
            if let Some(v) = self.metric(name).await
                && check(v)
            {
                return Ok(v);
            }
            if started.elapsed() > DEADLINE {
                bail!(
                    "timed out waiting for metric {name}; operator log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops with SIGTERM (the lease is released) and waits for the exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").arg("-TERM").arg(&pid).status()?;
        let started = Instant::now();
        while self.child.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(20) {
                self.child.kill()?;
                bail!("operator did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The standard manifest for tests: the minimal sample with a name and extra spec lines.
pub fn manifest(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata:\n  name: {name}\nspec:\n  embedding:\n    provider: local\n    dimension: 384\n  tenants:\n    - name: team-a\n      apiKeySecret: {{name: team-a-key, key: api-key}}\n{extra}"
    )
}

pub async fn delete_namespace(client: &Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(ns, &DeleteParams::background()).await;
}

//! Stage 2 of reconcile: the desired children, built purely from the validated cache and what
//! the apply stage observed. Never holds a Client; snapshot-tested.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, KeyToPath,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PodAffinity, PodAffinityTerm, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SeccompProfile, Secret, SecretKeySelector, SecretProjection,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use semantis_contract::{
    CacheDefaults, DataplaneConfig, EmbedderConfig, EmbeddingProvider, PostgresConfig, RedisConfig,
    ServerConfig, StorageConfig, TenantConfig, VerifierConfig,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::{AccessMode, SecretKeyRef, SemanticCache};
use crate::validate::{PostgresSource, ValidatedCache};

pub const MANAGED_BY: &str = "semantis-operator";
pub const CACHE_LABEL: &str = "semantis.dev/cache";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const TARGET_FINGERPRINT_LABEL: &str = "semantis.dev/target-fingerprint";
pub const CONFIG_HASH_ANNOTATION: &str = "semantis.dev/config-hash";
pub const DATAPLANE_PORT: i32 = 8080;
/// The dataplane's metrics port (`server.metrics_listen`): `/metrics`, the detailed `/readyz`.
pub const DATAPLANE_METRICS_PORT: i32 = 9464;
pub const CONFIG_KEY: &str = "dataplane.toml";
const CONFIG_DIR: &str = "/etc/semantis/config";
const DATA_DIR: &str = "/var/lib/semantis";
const MODEL_DIR: &str = "/opt/semantis/models/all-MiniLM-L6-v2";

/// What the apply stage read from the cluster (or generated once) for the builders.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Redis password: read from the existing Secret, generated on first reconcile.
    pub redis_password: String,
    /// Postgres role the dataplane logs in as, and, in admin mode, its password (the operator
    /// writes the credentials Secret).
    pub postgres: Option<PostgresLogin>,
    /// The index version the dataplane serves.
    pub active: EmbedderConfig,
    /// The index version a migration is building (also while it has failed).
    pub target: Option<EmbedderConfig>,
    /// Whether the reindex Job may exist: every dataplane replica already runs with the target
    /// (so writes reach both versions while the Job copies), or the Job was created before.
    pub start_reindex: bool,
    /// Whether the monitoring.coreos.com ServiceMonitor CRD is installed.
    pub service_monitor_crd: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostgresLogin {
    pub username: String,
    /// Some in admin mode: goes into the `<name>-postgres` Secret.
    pub managed_password: Option<String>,
}

/// One desired child, ready for server-side apply.
#[derive(Debug, Clone)]
pub struct Child {
    pub resource: ApiResource,
    pub object: DynamicObject,
}

impl Child {
    pub fn name(&self) -> &str {
        self.object.metadata.name.as_deref().unwrap_or_default()
    }
    pub fn kind(&self) -> &str {
        &self.resource.kind
    }
}

/// Why build could not render the children: a bug in a builder, never the spec's fault
/// (validate refused what the builders cannot take).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("failed to encode the {kind} as a dynamic object: {source}")]
    Object {
        kind: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to render the dataplane configuration as TOML: {0}")]
    Config(#[from] toml::ser::Error),
}

fn child<K>(obj: K) -> Result<Child, BuildError>
where
    K: Resource<DynamicType = ()> + Serialize,
{
    let resource = ApiResource::erase::<K>(&());
    let failed = |source| BuildError::Object {
        kind: resource.kind.clone(),
        source,
    };
    let mut value = serde_json::to_value(&obj).map_err(failed)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), resource.api_version.clone().into());
        map.insert("kind".into(), resource.kind.clone().into());
    }
    let object = serde_json::from_value(value).map_err(failed)?;
    Ok(Child { resource, object })
}

pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

pub fn child_names(cache_name: &str) -> ChildNames {
    ChildNames {
        redis: format!("{cache_name}-redis"),
        redis_config: format!("{cache_name}-redis-config"),
        postgres: format!("{cache_name}-postgres"),
        dataplane: format!("{cache_name}-dataplane"),
        data: format!("{cache_name}-data"),
        backup: format!("{cache_name}-backup"),
    }
}

pub struct ChildNames {
    pub redis: String,
    pub redis_config: String,
    pub postgres: String,
    pub dataplane: String,
    pub data: String,
    pub backup: String,
}

/// Name of the reindex Job for one target: the fingerprint makes a retried spec a new Job and
/// a reverted spec a Job the cache no longer wants.
pub fn reindex_job_name(cache_name: &str, target: &EmbedderConfig) -> String {
    let fp = target.fingerprint();
    format!("{cache_name}-reindex-{}", &fp[..10])
}

fn labels(c: &ValidatedCache, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "semantis".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), c.name.clone()),
        (COMPONENT_LABEL.to_owned(), component.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (CACHE_LABEL.to_owned(), c.name.clone()),
    ])
}

fn selector(c: &ValidatedCache, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), c.name.clone()),
        (COMPONENT_LABEL.to_owned(), component.to_owned()),
    ])
}

fn owner(c: &ValidatedCache) -> OwnerReference {
    OwnerReference {
        api_version: SemanticCache::api_version(&()).into_owned(),
        kind: SemanticCache::kind(&()).into_owned(),
        name: c.name.clone(),
        uid: c.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn meta(c: &ValidatedCache, name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(c.namespace.clone()),
        labels: Some(labels(c, component)),
        owner_references: Some(vec![owner(c)]),
        ..ObjectMeta::default()
    }
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

fn pod_security(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

fn hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..16])
}

/// Everything the cache wants, in a stable order.
/// The hash on the dataplane's pod template. Pods restart whenever the rendered config changes,
/// the migration target included: serving replicas must write to the target (dual writes)
/// before the reindex Job copies, or stores made during the copy would miss the new version.
pub fn config_hash(c: &ValidatedCache, o: &Observed) -> Result<String, BuildError> {
    let config = dataplane_config(c, o, &child_names(&c.name));
    Ok(hash(toml::to_string(&config)?.as_bytes()))
}

pub fn build(c: &ValidatedCache, o: &Observed) -> Result<Vec<Child>, BuildError> {
    let names = child_names(&c.name);
    let config = dataplane_config(c, o, &names);
    let config_toml = toml::to_string(&config)?;
    let serving_hash = hash(config_toml.as_bytes());
    let mut out = vec![
        child(redis_secret(c, o, &names))?,
        child(redis_config(c, &names))?,
        child(redis_service(c, &names))?,
        child(redis_statefulset(c, &names))?,
    ];
    if let (Some(pg), Some(login)) = (&c.postgres, &o.postgres)
        && let (PostgresSource::Admin(_), Some(password)) = (&pg.source, &login.managed_password)
    {
        out.push(child(postgres_secret(
            c,
            pg,
            &login.username,
            password,
            &names,
        ))?);
    }
    out.push(child(dataplane_configmap(c, &names, &config_toml))?);
    out.push(child(dataplane_pvc(c, &names))?);
    out.push(child(dataplane_service(c, &names))?);
    out.push(child(dataplane_deployment(c, &names, &serving_hash))?);
    if let Some(b) = &c.backup {
        out.push(child(backup_cronjob(c, b, &names))?);
    }
    if let Some(target) = o.target.as_ref().filter(|_| o.start_reindex) {
        out.push(child(reindex_job(c, target, &names))?);
    }
    if c.service_monitor && o.service_monitor_crd {
        out.push(service_monitor(c, &names));
    }
    Ok(out)
}

fn redis_secret(c: &ValidatedCache, o: &Observed, n: &ChildNames) -> Secret {
    Secret {
        metadata: meta(c, &n.redis, "redis"),
        data: Some(BTreeMap::from([(
            "password".to_owned(),
            ByteString(o.redis_password.clone().into_bytes()),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

fn redis_config(c: &ValidatedCache, n: &ChildNames) -> ConfigMap {
    let mut conf = String::from(
        "# Rendered by semantis-operator.\n\
         port 6379\n\
         dir /data\n\
         protected-mode no\n\
         # Only keys with a TTL (hot layer, embedding cache) may be evicted; the write-ahead\n\
         # log streams have none and must never be.\n\
         maxmemory-policy volatile-lru\n",
    );
    if let Some(m) = &c.redis.max_memory {
        conf.push_str(&format!("maxmemory {m}\n"));
    }
    if c.redis.persistence {
        // An acknowledged store must survive a crash: fsync every write.
        conf.push_str("appendonly yes\nappendfsync always\n");
    } else {
        conf.push_str("appendonly no\nsave \"\"\n");
    }
    ConfigMap {
        metadata: meta(c, &n.redis_config, "redis"),
        data: Some(BTreeMap::from([("redis.conf".to_owned(), conf)])),
        ..ConfigMap::default()
    }
}

fn redis_service(c: &ValidatedCache, n: &ChildNames) -> Service {
    Service {
        metadata: meta(c, &n.redis, "redis"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector(c, "redis")),
            ports: Some(vec![ServicePort {
                name: Some("redis".to_owned()),
                port: 6379,
                target_port: Some(IntOrString::String("redis".to_owned())),
                ..ServicePort::default()
            }]),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn redis_primary_host(c: &ValidatedCache, n: &ChildNames) -> String {
    format!("{0}-0.{0}.{1}.svc", n.redis, c.namespace)
}

fn redis_statefulset(c: &ValidatedCache, n: &ChildNames) -> StatefulSet {
    // Pod 0 is the primary; the others replicate it.
    let script = format!(
        "set -e\n\
         cp /config/redis.conf /data/redis.conf.rendered\n\
         echo \"requirepass $REDIS_PASSWORD\" >> /data/redis.conf.rendered\n\
         echo \"masterauth $REDIS_PASSWORD\" >> /data/redis.conf.rendered\n\
         case \"$HOSTNAME\" in\n\
         *-0) ;;\n\
         *) echo \"replicaof {} 6379\" >> /data/redis.conf.rendered ;;\n\
         esac\n\
         exec redis-server /data/redis.conf.rendered\n",
        redis_primary_host(c, n)
    );
    let mut claim_spec = PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_owned(),
                c.redis.storage_size.clone(),
            )])),
            limits: None,
        }),
        ..PersistentVolumeClaimSpec::default()
    };
    claim_spec.storage_class_name = c.redis.storage_class_name.clone();
    let container = Container {
        name: "redis".to_owned(),
        image: Some(c.redis.image.clone()),
        command: Some(vec!["sh".to_owned(), "-c".to_owned(), script]),
        env: Some(vec![secret_env("REDIS_PASSWORD", &n.redis, "password")]),
        ports: Some(vec![ContainerPort {
            name: Some("redis".to_owned()),
            container_port: 6379,
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "sh".to_owned(),
                    "-c".to_owned(),
                    "redis-cli --no-auth-warning -a \"$REDIS_PASSWORD\" ping | grep -q PONG"
                        .to_owned(),
                ]),
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        resources: c.redis.resources.clone(),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".to_owned(),
                mount_path: "/data".to_owned(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "config".to_owned(),
                mount_path: "/config".to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    StatefulSet {
        metadata: meta(c, &n.redis, "redis"),
        spec: Some(StatefulSetSpec {
            replicas: Some(c.redis.replicas),
            service_name: Some(n.redis.clone()),
            selector: LabelSelector {
                match_labels: Some(selector(c, "redis")),
                match_expressions: None,
            },
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".to_owned()),
                    when_scaled: Some("Retain".to_owned()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(c, "redis")),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    security_context: Some(pod_security(999)),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "config".to_owned(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: n.redis_config.clone(),
                            ..ConfigMapVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(claim_spec),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn postgres_secret(
    c: &ValidatedCache,
    pg: &crate::validate::Postgres,
    username: &str,
    password: &str,
    n: &ChildNames,
) -> Secret {
    let data = [
        ("username", username.to_owned()),
        ("password", password.to_owned()),
        ("host", pg.host.clone()),
        ("port", pg.port.to_string()),
        ("database", pg.database.clone()),
    ];
    Secret {
        metadata: meta(c, &n.postgres, "postgres"),
        type_: Some("kubernetes.io/basic-auth".to_owned()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The Secret the dataplane reads its Postgres password from.
fn postgres_secret_name(c: &ValidatedCache, n: &ChildNames) -> Option<String> {
    c.postgres.as_ref().map(|pg| match &pg.source {
        PostgresSource::Admin(_) => n.postgres.clone(),
        PostgresSource::Existing(s) => s.name.clone(),
    })
}

/// The dataplane's configuration file, rendered from the contract crate.
pub fn dataplane_config(c: &ValidatedCache, o: &Observed, n: &ChildNames) -> DataplaneConfig {
    let embedder = |e: &EmbedderConfig| {
        let mut e = e.clone();
        if e.provider == EmbeddingProvider::Local {
            e.model_dir = Some(MODEL_DIR.to_owned());
        }
        if c.embedding.api_key_secret.is_some() {
            e.api_key_file = Some("/etc/semantis/embedder/api-key".to_owned());
        }
        e
    };
    DataplaneConfig {
        server: ServerConfig {
            listen: format!("0.0.0.0:{DATAPLANE_PORT}"),
            metrics_listen: format!("0.0.0.0:{DATAPLANE_METRICS_PORT}"),
            // Endpoint removal races SIGTERM: keep serving until kube-proxies have caught up.
            // With the 10 s drain this stays inside the default 30 s termination grace.
            shutdown_delay_ms: 5_000,
            ..ServerConfig::default()
        },
        storage: StorageConfig {
            data_dir: DATA_DIR.to_owned(),
            retired_grace_secs: c.dataplane.retired_grace_secs,
            ..StorageConfig::default()
        },
        redis: Some(RedisConfig {
            url: format!("redis://{}:6379", redis_primary_host(c, n)),
            password_file: Some("/etc/semantis/redis/password".to_owned()),
        }),
        postgres: match (&c.postgres, &o.postgres) {
            (Some(pg), Some(login)) => Some(PostgresConfig {
                url: format!(
                    "postgres://{}@{}:{}/{}",
                    login.username, pg.host, pg.port, pg.database
                ),
                password_file: Some("/etc/semantis/postgres/password".to_owned()),
            }),
            _ => None,
        },
        embedder: embedder(&o.active),
        target_embedder: o.target.as_ref().map(embedder),
        cache: CacheDefaults {
            min_similarity: c.min_similarity,
            verifier: c.verifier.clone(),
            verifier_budget_ms: c
                .verifier_budget_ms
                .unwrap_or(CacheDefaults::default().verifier_budget_ms),
            default_ttl_secs: c.default_ttl_secs,
            max_entries: c.max_entries,
            max_bytes: c.max_bytes,
            eviction: c.eviction,
            ..CacheDefaults::default()
        },
        verifiers: verifiers_config(c),
        upstreams: c
            .upstreams
            .iter()
            .map(|u| {
                let mut config = u.config.clone();
                config.api_key_file = u
                    .api_key_secret
                    .as_ref()
                    .map(|_| upstream_key_file(&u.name));
                (u.name.clone(), config)
            })
            .collect(),
        tenants: c
            .tenants
            .iter()
            .map(|t| TenantConfig {
                name: t.name.clone(),
                api_key_sha256: Vec::new(),
                api_key_files: vec![format!("/etc/semantis/tenants/{}/api-key", t.name)],
                min_similarity: t.min_similarity,
                default_ttl_secs: t.default_ttl_secs,
                max_entries: t.max_entries,
                max_bytes: t.max_bytes,
                eviction: None,
                verifier: t.verifier.clone(),
                verifier_min_score: t.verifier_min_score,
                verifier_budget_ms: t.verifier_budget_ms,
                target_error_rate: t.target_error_rate,
                upstream: t.upstream.clone(),
                upstream_key: t.upstream_key,
                max_cacheable_temperature: t.max_cacheable_temperature,
                limits: t.limits.clone(),
                max_concurrent_requests: t.max_concurrent_requests,
            })
            .collect(),
    }
}

/// Where an upstream's API key is mounted.
fn upstream_key_file(name: &str) -> String {
    format!("/etc/semantis/upstreams/{name}/api-key")
}

/// Where a verifier's API key is mounted.
fn verifier_key_file(name: &str) -> String {
    format!("/etc/semantis/verifiers/{name}/api-key")
}

/// spec.verifiers in the contract's form, and the built-in `local` one pointed at the image's
/// model directory (which holds the verifier file beside the embedder's weights) unless the
/// spec defines its own `local`.
fn verifiers_config(c: &ValidatedCache) -> BTreeMap<String, VerifierConfig> {
    let mut out: BTreeMap<String, VerifierConfig> = c
        .verifiers
        .iter()
        .map(|v| {
            let local = v.provider == semantis_contract::VerifierProvider::Local;
            (
                v.name.clone(),
                VerifierConfig {
                    provider: v.provider,
                    model_dir: local.then(|| MODEL_DIR.to_owned()),
                    endpoint: v.endpoint.clone(),
                    model: v.model.clone(),
                    api_key_file: v
                        .api_key_secret
                        .as_ref()
                        .map(|_| verifier_key_file(&v.name)),
                    min_score: v.min_score,
                    min_similarity: v.min_similarity,
                    ..VerifierConfig::default()
                },
            )
        })
        .collect();
    out.entry(semantis_contract::LOCAL_VERIFIER.to_owned())
        .or_insert_with(|| VerifierConfig {
            model_dir: Some(MODEL_DIR.to_owned()),
            ..VerifierConfig::default()
        });
    out
}

fn dataplane_configmap(c: &ValidatedCache, n: &ChildNames, toml: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(c, &n.dataplane, "dataplane"),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), toml.to_owned())])),
        ..ConfigMap::default()
    }
}

fn access_mode_str(m: AccessMode) -> &'static str {
    match m {
        AccessMode::ReadWriteOnce => "ReadWriteOnce",
        AccessMode::ReadWriteMany => "ReadWriteMany",
    }
}

fn dataplane_pvc(c: &ValidatedCache, n: &ChildNames) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta(c, &n.data, "dataplane"),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![access_mode_str(c.dataplane.access_mode).to_owned()]),
            storage_class_name: c.dataplane.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    c.dataplane.storage_size.clone(),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn dataplane_service(c: &ValidatedCache, n: &ChildNames) -> Service {
    Service {
        metadata: meta(c, &n.dataplane, "dataplane"),
        spec: Some(ServiceSpec {
            selector: Some(selector(c, "dataplane")),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".to_owned()),
                    port: DATAPLANE_PORT,
                    target_port: Some(IntOrString::String("http".to_owned())),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("metrics".to_owned()),
                    port: DATAPLANE_METRICS_PORT,
                    target_port: Some(IntOrString::String("metrics".to_owned())),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Volumes and mounts every dataplane process (serve, reindex, backup) needs.
fn dataplane_volumes(c: &ValidatedCache, n: &ChildNames) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: n.dataplane.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "data".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: n.data.clone(),
                read_only: None,
            }),
            ..Volume::default()
        },
        secret_volume("redis", &n.redis, "password", "password"),
        // The root filesystem is read-only; LanceDB's merge-insert (every flush) and index
        // builds spill to a temporary directory, so /tmp is a writable scratch volume.
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR),
        VolumeMount {
            name: "data".to_owned(),
            mount_path: DATA_DIR.to_owned(),
            ..VolumeMount::default()
        },
        mount("redis", "/etc/semantis/redis"),
        VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        },
    ];
    if let Some(secret) = postgres_secret_name(c, n) {
        volumes.push(secret_volume("postgres", &secret, "password", "password"));
        mounts.push(mount("postgres", "/etc/semantis/postgres"));
    }
    if let Some(key) = &c.embedding.api_key_secret {
        volumes.push(secret_volume("embedder", &key.name, &key.key, "api-key"));
        mounts.push(mount("embedder", "/etc/semantis/embedder"));
    }
    let verifier_keys = c
        .verifiers
        .iter()
        .filter_map(|v| Some((v.name.as_str(), v.api_key_secret.as_ref()?)));
    keys_volume(
        "verifier-keys",
        "/etc/semantis/verifiers",
        verifier_keys,
        &mut volumes,
        &mut mounts,
    );
    let upstream_keys = c
        .upstreams
        .iter()
        .filter_map(|u| Some((u.name.as_str(), u.api_key_secret.as_ref()?)));
    keys_volume(
        "upstream-keys",
        "/etc/semantis/upstreams",
        upstream_keys,
        &mut volumes,
        &mut mounts,
    );
    let tenant_keys = c
        .tenants
        .iter()
        .map(|t| (t.name.as_str(), &t.api_key_secret));
    keys_volume(
        "tenant-keys",
        "/etc/semantis/tenants",
        tenant_keys,
        &mut volumes,
        &mut mounts,
    );
    (volumes, mounts)
}

/// One projected volume of API keys mounted at `dir`, each at `<owner>/api-key`; nothing when
/// there are none.
fn keys_volume<'a>(
    name: &str,
    dir: &str,
    keys: impl Iterator<Item = (&'a str, &'a SecretKeyRef)>,
    volumes: &mut Vec<Volume>,
    mounts: &mut Vec<VolumeMount>,
) {
    let sources: Vec<VolumeProjection> = keys
        .map(|(owner, key)| VolumeProjection {
            secret: Some(SecretProjection {
                name: key.name.clone(),
                items: Some(vec![KeyToPath {
                    key: key.key.clone(),
                    path: format!("{owner}/api-key"),
                    mode: None,
                }]),
                optional: None,
            }),
            ..VolumeProjection::default()
        })
        .collect();
    if sources.is_empty() {
        return;
    }
    volumes.push(Volume {
        name: name.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            default_mode: None,
        }),
        ..Volume::default()
    });
    mounts.push(mount(name, dir));
}

fn secret_volume(name: &str, secret: &str, key: &str, path: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            items: Some(vec![KeyToPath {
                key: key.to_owned(),
                path: path.to_owned(),
                mode: None,
            }]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn dataplane_container(
    c: &ValidatedCache,
    name: &str,
    args: Vec<String>,
    mounts: Vec<VolumeMount>,
) -> Container {
    Container {
        name: name.to_owned(),
        image: Some(c.dataplane.image.clone()),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "RUST_LOG".to_owned(),
            value: Some("info".to_owned()),
            ..EnvVar::default()
        }]),
        resources: c.dataplane.resources.clone(),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

fn config_args(command: &str) -> Vec<String> {
    vec![
        command.to_owned(),
        "--config".to_owned(),
        format!("{CONFIG_DIR}/{CONFIG_KEY}"),
    ]
}

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    }
}

fn dataplane_deployment(c: &ValidatedCache, n: &ChildNames, config_hash: &str) -> Deployment {
    let (volumes, mounts) = dataplane_volumes(c, n);
    let init_containers = bootstrap_container(c, mounts.clone()).map(|b| vec![b]);
    let mut container = dataplane_container(c, "dataplane", config_args("serve"), mounts);
    container.ports = Some(vec![
        ContainerPort {
            name: Some("http".to_owned()),
            container_port: DATAPLANE_PORT,
            ..ContainerPort::default()
        },
        ContainerPort {
            name: Some("metrics".to_owned()),
            container_port: DATAPLANE_METRICS_PORT,
            ..ContainerPort::default()
        },
    ]);
    container.readiness_probe = Some(http_probe("/readyz"));
    container.liveness_probe = Some(Probe {
        failure_threshold: Some(6),
        ..http_probe("/healthz")
    });
    // A new pod starts and turns ready before the old one stops, so a rollout (a config change,
    // each step of an index migration) fails no request. A ReadWriteOnce volume is attached
    // to one node: the pods are required onto a node already running one of them, so the
    // surge pod lands beside the old one and mounts the same volume (the first pod, with none
    // running, may go anywhere). Both run for the seconds of the handover; the flush lease in
    // Redis keeps the table to one writer, and SQLite's file locks hold on a local volume.
    let strategy = DeploymentStrategy {
        type_: Some("RollingUpdate".to_owned()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(1)),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    };
    let affinity = match c.dataplane.access_mode {
        AccessMode::ReadWriteMany => None,
        AccessMode::ReadWriteOnce => Some(beside_the_dataplane(c)),
    };
    Deployment {
        metadata: meta(c, &n.dataplane, "dataplane"),
        spec: Some(DeploymentSpec {
            replicas: Some(c.dataplane.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(c, "dataplane")),
                match_expressions: None,
            },
            strategy: Some(strategy),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(c, "dataplane")),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        config_hash.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    security_context: Some(pod_security(65532)),
                    affinity,
                    init_containers,
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The S3 client's environment for backup and restore: keys from the Secret, region, and the
/// endpoint of an S3-compatible server.
fn s3_env(secret: &str, region: &str, endpoint: Option<&str>) -> Vec<EnvVar> {
    let mut env = vec![
        secret_env("AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID"),
        secret_env("AWS_SECRET_ACCESS_KEY", secret, "AWS_SECRET_ACCESS_KEY"),
        EnvVar {
            name: "AWS_REGION".to_owned(),
            value: Some(region.to_owned()),
            ..EnvVar::default()
        },
    ];
    if let Some(endpoint) = endpoint {
        env.push(EnvVar {
            name: "AWS_ENDPOINT_URL".to_owned(),
            value: Some(endpoint.to_owned()),
            ..EnvVar::default()
        });
    }
    env
}

/// `spec.bootstrap.backup` as an init container: `restore --if-empty` with the dataplane's
/// volumes, so the first pod of a new cache restores the backup and every later start (a
/// restart, a rollout's surge pod) finds the data and does nothing.
fn bootstrap_container(c: &ValidatedCache, mounts: Vec<VolumeMount>) -> Option<Container> {
    let b = c.bootstrap.as_ref()?;
    let mut args = config_args("restore");
    args.extend([
        "--from".to_owned(),
        format!("s3://{}/{}", b.bucket, b.prefix),
        "--if-empty".to_owned(),
    ]);
    if let Some(id) = &b.backup_id {
        args.extend(["--backup".to_owned(), id.clone()]);
    }
    let mut container = dataplane_container(c, "bootstrap", args, mounts);
    let mut env = container.env.take().unwrap_or_default();
    env.extend(s3_env(
        &b.credentials_secret.name,
        &b.region,
        b.endpoint.as_deref(),
    ));
    container.env = Some(env);
    Some(container)
}

fn backup_cronjob(c: &ValidatedCache, b: &crate::validate::Backup, n: &ChildNames) -> CronJob {
    let (volumes, mounts) = dataplane_volumes(c, n);
    let mut args = config_args("backup");
    args.extend([
        "--to".to_owned(),
        format!("s3://{}/{}", b.bucket, b.prefix),
        "--keep".to_owned(),
        b.retention.to_string(),
    ]);
    let mut container = dataplane_container(c, "backup", args, mounts);
    let mut env = container.env.take().unwrap_or_default();
    env.extend(s3_env(
        &b.credentials_secret.name,
        &b.region,
        b.endpoint.as_deref(),
    ));
    container.env = Some(env);
    CronJob {
        metadata: meta(c, &n.backup, "backup"),
        spec: CronJobSpec {
            schedule: b.schedule.clone(),
            concurrency_policy: Some("Forbid".to_owned()),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(c, "backup")),
                    ..ObjectMeta::default()
                }),
                spec: Some(run_once(
                    c,
                    ObjectMeta {
                        labels: Some(labels(c, "backup")),
                        ..ObjectMeta::default()
                    },
                    container,
                    volumes,
                )),
            },
            ..CronJobSpec::default()
        },
        ..CronJob::default()
    }
}

fn reindex_job(c: &ValidatedCache, target: &EmbedderConfig, n: &ChildNames) -> Job {
    let (volumes, mounts) = dataplane_volumes(c, n);
    let container = dataplane_container(c, "reindex", config_args("reindex"), mounts);
    let fp = target.fingerprint();
    let mut job_labels = labels(c, "reindex");
    job_labels.insert(TARGET_FINGERPRINT_LABEL.to_owned(), fp.clone());
    let mut job_meta = meta(c, &reindex_job_name(&c.name, target), "reindex");
    job_meta.labels = Some(job_labels.clone());
    job_meta.annotations = Some(BTreeMap::from([
        ("semantis.dev/target-model".to_owned(), target.model.clone()),
        (
            "semantis.dev/target-dimension".to_owned(),
            target.dimension.to_string(),
        ),
    ]));
    Job {
        metadata: job_meta.clone(),
        spec: Some(run_once(
            c,
            ObjectMeta {
                labels: Some(job_labels),
                annotations: job_meta.annotations,
                ..ObjectMeta::default()
            },
            container,
            volumes,
        )),
        ..Job::default()
    }
}

/// Required onto a node that runs a dataplane pod of this cache: where its ReadWriteOnce
/// volume is attached.
fn beside_the_dataplane(c: &ValidatedCache) -> Affinity {
    Affinity {
        pod_affinity: Some(PodAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector(c, "dataplane")),
                    match_expressions: None,
                }),
                topology_key: "kubernetes.io/hostname".to_owned(),
                ..PodAffinityTerm::default()
            }]),
            preferred_during_scheduling_ignored_during_execution: None,
        }),
        ..Affinity::default()
    }
}

/// A Job spec that runs one dataplane command to completion (backup, reindex), retried twice.
/// With a ReadWriteOnce volume the pod must run on the node that has the volume attached for
/// the dataplane, or it waits forever on a Multi-Attach error: it is required onto a node
/// running a dataplane pod of this cache.
fn run_once(
    c: &ValidatedCache,
    pod_meta: ObjectMeta,
    container: Container,
    volumes: Vec<Volume>,
) -> JobSpec {
    let affinity = match c.dataplane.access_mode {
        AccessMode::ReadWriteMany => None,
        AccessMode::ReadWriteOnce => Some(beside_the_dataplane(c)),
    };
    JobSpec {
        backoff_limit: Some(2),
        template: PodTemplateSpec {
            metadata: Some(pod_meta),
            spec: Some(PodSpec {
                restart_policy: Some("Never".to_owned()),
                security_context: Some(pod_security(65532)),
                affinity,
                containers: vec![container],
                volumes: Some(volumes),
                ..PodSpec::default()
            }),
        },
        ..JobSpec::default()
    }
}

fn service_monitor(c: &ValidatedCache, n: &ChildNames) -> Child {
    let resource = service_monitor_resource();
    let mut labels = labels(c, "dataplane");
    labels.extend(c.service_monitor_labels.clone());
    let mut object = DynamicObject::new(&n.dataplane, &resource).within(&c.namespace);
    object.metadata.labels = Some(labels);
    object.metadata.owner_references = Some(vec![owner(c)]);
    // Keys in alphabetical order: serde_json keeps insertion order in some builds of the
    // workspace and sorts in others, and the snapshot must not depend on which.
    object.data = serde_json::json!({
        "spec": {
            "endpoints": [{ "interval": "30s", "path": "/metrics", "port": "metrics" }],
            "selector": { "matchLabels": selector(c, "dataplane") },
        }
    });
    Child { resource, object }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{OperatorDefaults, validate};

    fn sample(file: &str) -> SemanticCache {
        let path = format!("{}/../config/samples/{file}", crate::manifest_dir());
        let text = std::fs::read_to_string(&path).expect("sample readable");
        let mut cache: SemanticCache = serde_yaml::from_str(&text).expect("sample parses");
        cache.metadata.namespace = Some("team".into());
        cache.metadata.uid = Some("11111111-2222-3333-4444-555555555555".into());
        cache.metadata.generation = Some(1);
        cache
    }

    fn defaults() -> OperatorDefaults {
        OperatorDefaults {
            dataplane_image: "ghcr.io/semantis/semantis-dataplane:test".into(),
            redis_image: crate::validate::DEFAULT_REDIS_IMAGE.into(),
        }
    }

    fn observed(c: &ValidatedCache) -> Observed {
        Observed {
            redis_password: "redis-password-from-secret".into(),
            postgres: c.postgres.as_ref().map(|pg| PostgresLogin {
                username: pg.managed_role(),
                managed_password: Some("postgres-password-from-secret".into()),
            }),
            active: c.embedder.clone(),
            target: None,
            start_reindex: false,
            service_monitor_crd: true,
        }
    }

    /// Observed mid-migration: a target (revision v2) whose reindex Job is due.
    fn reindexing(c: &ValidatedCache) -> Observed {
        let mut o = observed(c);
        let mut target = c.embedder.clone();
        target.revision = "v2".into();
        o.target = Some(target);
        o.start_reindex = true;
        o
    }

    fn render(children: &[Child]) -> String {
        children
            .iter()
            .map(|c| serde_yaml::to_string(&c.object).expect("serialises"))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    #[test]
    fn minimal_sample_children() {
        let c = validate(
            &sample("semantis_v1alpha1_semanticcache_minimal.yaml"),
            &defaults(),
        )
        .expect("valid");
        insta::assert_snapshot!(render(&build(&c, &observed(&c)).expect("builds")));
    }

    #[test]
    fn full_sample_children() {
        let c = validate(
            &sample("semantis_v1alpha1_semanticcache_full.yaml"),
            &defaults(),
        )
        .expect("valid");
        insta::assert_snapshot!(render(&build(&c, &observed(&c)).expect("builds")));
    }

    #[test]
    fn a_migration_adds_the_reindex_job_and_the_target_to_the_config() {
        let c = validate(
            &sample("semantis_v1alpha1_semanticcache_minimal.yaml"),
            &defaults(),
        )
        .expect("valid");
        let mut o = observed(&c);
        let mut target = c.embedder.clone();
        target.revision = "v2".into();
        let before = config_hash(&c, &o).expect("hashes");
        o.target = Some(target.clone());
        // The replicas roll to dual writes first; no Job until they run with the target.
        assert_ne!(config_hash(&c, &o).expect("hashes"), before);
        assert!(
            !build(&c, &o)
                .expect("builds")
                .iter()
                .any(|ch| ch.kind() == "Job")
        );
        o.start_reindex = true;
        let children = build(&c, &o).expect("builds");
        let job = children
            .iter()
            .find(|ch| ch.kind() == "Job")
            .expect("reindex job");
        assert_eq!(job.name(), reindex_job_name("demo", &target));
        let cm = children
            .iter()
            .find(|ch| ch.kind() == "ConfigMap" && ch.name() == "demo-dataplane")
            .expect("configmap");
        let toml_text = cm.object.data["data"][CONFIG_KEY].as_str().expect("toml");
        let cfg: DataplaneConfig = toml::from_str(toml_text).expect("contract parses");
        assert_eq!(cfg.embedder.fingerprint(), c.embedder.fingerprint());
        assert_eq!(
            cfg.target_embedder.expect("target").fingerprint(),
            target.fingerprint()
        );
    }

    /// The Job pods' required pod affinity for a ReadWriteOnce volume, as (selector, topology).
    fn job_affinity(ch: &Child) -> Option<(serde_json::Value, String)> {
        let pod = match ch.kind() {
            "CronJob" => &ch.object.data["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => &ch.object.data["spec"]["template"]["spec"],
        };
        let term =
            &pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
        term.is_object().then(|| {
            (
                term["labelSelector"]["matchLabels"].clone(),
                term["topologyKey"].as_str().unwrap_or_default().to_owned(),
            )
        })
    }

    #[test]
    fn backup_and_reindex_pods_run_beside_the_dataplane_that_holds_a_read_write_once_volume() {
        let mut cache = sample("semantis_v1alpha1_semanticcache_minimal.yaml");
        cache.spec.backup = Some(crate::crd::BackupSpec {
            schedule: "0 3 * * *".into(),
            s3: crate::crd::S3Spec {
                bucket: "backups".into(),
                prefix: None,
                endpoint: None,
                region: None,
            },
            credentials_secret: crate::crd::LocalSecretRef { name: "s3".into() },
            retention: None,
        });
        let c = validate(&cache, &defaults()).expect("valid");
        let children = build(&c, &reindexing(&c)).expect("builds");
        let dataplane = children
            .iter()
            .find(|ch| ch.kind() == "Deployment")
            .expect("dataplane");
        let dataplane_labels = &dataplane.object.data["spec"]["selector"]["matchLabels"];
        for kind in ["CronJob", "Job"] {
            let job = children.iter().find(|ch| ch.kind() == kind).expect(kind);
            let (selector, topology) = job_affinity(job).expect("a required pod affinity");
            assert_eq!(&selector, dataplane_labels, "{kind}");
            assert_eq!(topology, "kubernetes.io/hostname", "{kind}");
        }

        // A shared volume mounts anywhere: no affinity.
        let full = validate(
            &sample("semantis_v1alpha1_semanticcache_full.yaml"),
            &defaults(),
        )
        .expect("valid");
        let children = build(&full, &observed(&full)).expect("builds");
        let cron = children
            .iter()
            .find(|ch| ch.kind() == "CronJob")
            .expect("cron");
        assert_eq!(job_affinity(cron), None);
    }

    #[test]
    fn every_dataplane_container_has_a_writable_tmp_under_its_read_only_root() {
        let c = validate(
            &sample("semantis_v1alpha1_semanticcache_full.yaml"),
            &defaults(),
        )
        .expect("valid");
        let children = build(&c, &reindexing(&c)).expect("builds");
        let mut checked = 0;
        for ch in &children {
            let pod = match ch.kind() {
                "Deployment" | "Job" => &ch.object.data["spec"]["template"]["spec"],
                "CronJob" => &ch.object.data["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                _ => continue,
            };
            for container in pod["containers"].as_array().expect("containers") {
                assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
                let tmp = container["volumeMounts"]
                    .as_array()
                    .expect("mounts")
                    .iter()
                    .find(|m| m["mountPath"] == "/tmp")
                    .unwrap_or_else(|| panic!("{} {}: no /tmp", ch.kind(), ch.name()));
                assert_ne!(tmp["readOnly"], true);
                let volume = pod["volumes"]
                    .as_array()
                    .expect("volumes")
                    .iter()
                    .find(|v| v["name"] == tmp["name"])
                    .expect("the /tmp volume");
                assert!(volume["emptyDir"].is_object(), "{volume}");
                checked += 1;
            }
        }
        assert_eq!(checked, 3, "the dataplane, backup and reindex containers");
    }

    #[test]
    fn a_bootstrap_restores_in_an_init_container_only_into_empty_stores() {
        let mut cache = sample("semantis_v1alpha1_semanticcache_minimal.yaml");
        cache.spec.bootstrap = Some(crate::crd::BootstrapSpec {
            backup: crate::crd::BootstrapBackup {
                s3: crate::crd::S3Spec {
                    bucket: "backups".into(),
                    prefix: Some("team/old".into()),
                    endpoint: Some("http://minio:9000".into()),
                    region: None,
                },
                credentials_secret: crate::crd::LocalSecretRef { name: "s3".into() },
                backup_id: None,
            },
        });
        let c = validate(&cache, &defaults()).expect("valid");
        let children = build(&c, &observed(&c)).expect("builds");
        let pod = &children
            .iter()
            .find(|ch| ch.kind() == "Deployment")
            .expect("dataplane")
            .object
            .data["spec"]["template"]["spec"];
        let init = &pod["initContainers"][0];
        let args: Vec<&str> = init["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert_eq!(args[0], "restore");
        assert!(
            args.windows(2)
                .any(|w| w == ["--from", "s3://backups/team/old"]),
            "{args:?}"
        );
        assert!(args.contains(&"--if-empty"), "{args:?}");
        assert_eq!(init["volumeMounts"], pod["containers"][0]["volumeMounts"]);
        let env: Vec<&str> = init["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        for name in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL",
        ] {
            assert!(env.contains(&name), "{name} missing: {env:?}");
        }

        // Without the prefix the default would name this cache, not the backed-up one.
        if let Some(b) = cache.spec.bootstrap.as_mut() {
            b.backup.s3.prefix = None;
        }
        let err = validate(&cache, &defaults()).expect_err("prefix required");
        assert_eq!(err.field, "spec.bootstrap.backup.s3.prefix");
    }

    #[test]
    fn the_rendered_config_is_the_contract_and_lists_every_tenant_once() {
        let c = validate(
            &sample("semantis_v1alpha1_semanticcache_full.yaml"),
            &defaults(),
        )
        .expect("valid");
        let cfg = dataplane_config(&c, &observed(&c), &child_names("prod"));
        let text = toml::to_string(&cfg).expect("toml");
        let back: DataplaneConfig = toml::from_str(&text).expect("parses back");
        assert_eq!(back, cfg);
        let names: Vec<_> = back.tenants.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["search", "support-bot"]);
        assert_eq!(back.embedder.dimension, 1536);
        assert!(
            back.postgres
                .expect("pg")
                .url
                .contains("semantis_team_prod")
        );
    }

    #[test]
    fn no_service_monitor_without_its_crd() {
        let c = validate(
            &sample("semantis_v1alpha1_semanticcache_full.yaml"),
            &defaults(),
        )
        .expect("valid");
        let mut o = observed(&c);
        o.service_monitor_crd = false;
        assert!(
            !build(&c, &o)
                .expect("builds")
                .iter()
                .any(|ch| ch.kind() == "ServiceMonitor")
        );
    }

    #[test]
    fn tenant_order_in_the_spec_changes_no_child() {
        let mut cache = sample("semantis_v1alpha1_semanticcache_full.yaml");
        let c1 = validate(&cache, &defaults()).expect("valid");
        cache.spec.tenants.reverse();
        let c2 = validate(&cache, &defaults()).expect("valid");
        assert_eq!(
            render(&build(&c1, &observed(&c1)).expect("builds")),
            render(&build(&c2, &observed(&c2)).expect("builds"))
        );
    }
}

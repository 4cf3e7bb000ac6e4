//! Step 2, observe: the few facts build needs from the cluster, read-only. Nothing here
//! writes: Postgres provisioning is apply's, events are the pipeline's.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use rand::distr::{Alphanumeric, SampleString};

use super::index::{self, ReindexJob};
use super::status::deployment_rollout;
use crate::build::{CONFIG_HASH_ANNOTATION, PostgresLogin, child_names, reindex_job_name};
use crate::crd::{SemanticCache, SemanticCacheStatus};
use crate::postgres::Admin;
use crate::status::PostgresState;
use crate::validate::{PostgresSource, ValidatedCache};

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("failed to {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ObserveError {
    let action = action.into();
    move |source| ObserveError::Kube { action, source }
}

/// How the dataplane reaches Postgres, before apply provisions anything.
#[derive(Debug, Clone, PartialEq)]
pub enum PostgresPlan {
    /// No Postgres: SQLite on the dataplane volume.
    Embedded,
    /// A credentials Secret the user manages.
    Existing(PostgresLogin),
    /// The operator creates role and database through the admin Secret (idempotently).
    Admin {
        admin: Admin,
        login: PostgresLogin,
        database: String,
        /// The cache, `namespace/name`: the mark on the role it owns.
        owner: String,
    },
    /// Nothing to provision with; `login` is what build can still render.
    Unusable {
        login: Option<PostgresLogin>,
        reason: String,
        message: String,
    },
}

impl PostgresPlan {
    pub fn login(&self) -> Option<&PostgresLogin> {
        match self {
            Self::Embedded => None,
            Self::Existing(login) | Self::Admin { login, .. } => Some(login),
            Self::Unusable { login, .. } => login.as_ref(),
        }
    }
}

/// The dataplane Deployment as the cluster runs it (read during a migration).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningDataplane {
    /// The config hash on its pod template.
    pub config_hash: Option<String>,
    /// Every replica runs that template.
    pub rolled_out: bool,
}

/// What observe found.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// Read from the existing Secret, generated on first reconcile.
    pub redis_password: String,
    pub postgres: PostgresPlan,
    /// The reindex Job for the spec's embedder (Absent when no migration is wanted).
    pub reindex_job: ReindexJob,
    /// The dataplane Deployment, read only while a migration is wanted.
    pub dataplane: Option<RunningDataplane>,
    pub service_monitor_crd: bool,
    /// Referenced Secrets (or keys) that do not exist.
    pub missing_secrets: Vec<String>,
}

/// The cache with its status read fresh (a quorum read): the reflector's copy can predate
/// this operator's own last status write.
pub async fn fresh(api: &Api<SemanticCache>, name: &str) -> Result<SemanticCache, ObserveError> {
    api.get_status(name)
        .await
        .map_err(kube_err(format!("read SemanticCache {name}")))
}

pub async fn read_secret(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<Secret>, ObserveError> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(kube_err(format!("read Secret {name}")))
}

pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|v| !v.is_empty())
}

fn generate_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// The admin login in an admin Secret, or why there is none.
pub fn admin_login(
    secret: Option<&Secret>,
    name: &str,
    host: &str,
    port: u16,
) -> Result<Admin, (String, String)> {
    let Some(s) = secret else {
        return Err((
            "AdminSecretMissing".into(),
            format!("Secret {name} does not exist"),
        ));
    };
    match (secret_value(s, "username"), secret_value(s, "password")) {
        (Some(username), Some(password)) => Ok(Admin {
            host: host.to_owned(),
            port,
            username,
            password,
        }),
        _ => Err((
            "AdminSecretInvalid".into(),
            format!("Secret {name} needs username and password keys"),
        )),
    }
}

async fn postgres_plan(client: &Client, c: &ValidatedCache) -> Result<PostgresPlan, ObserveError> {
    let ns = &c.namespace;
    let Some(pg) = &c.postgres else {
        return Ok(PostgresPlan::Embedded);
    };
    Ok(match &pg.source {
        PostgresSource::Existing(secret) => match read_secret(client, ns, &secret.name).await? {
            Some(s) => match secret_value(&s, "username") {
                Some(username) => PostgresPlan::Existing(PostgresLogin {
                    username,
                    managed_password: None,
                }),
                None => PostgresPlan::Unusable {
                    login: None,
                    reason: "CredentialsInvalid".into(),
                    message: format!("Secret {} has no username key", secret.name),
                },
            },
            None => PostgresPlan::Unusable {
                login: None,
                reason: "CredentialsMissing".into(),
                message: format!("Secret {} does not exist", secret.name),
            },
        },
        PostgresSource::Admin(admin_secret) => {
            let names = child_names(&c.name);
            let password = match read_secret(client, ns, &names.postgres).await? {
                Some(s) => secret_value(&s, "password").unwrap_or_else(generate_password),
                None => generate_password(),
            };
            let login = PostgresLogin {
                username: pg.managed_role(),
                managed_password: Some(password),
            };
            let secret = read_secret(client, ns, &admin_secret.name).await?;
            match admin_login(secret.as_ref(), &admin_secret.name, &pg.host, pg.port) {
                Ok(admin) => PostgresPlan::Admin {
                    admin,
                    login,
                    database: pg.database.clone(),
                    owner: format!("{}/{}", c.namespace, c.name),
                },
                Err((reason, message)) => PostgresPlan::Unusable {
                    login: Some(login),
                    reason,
                    message,
                },
            }
        }
    })
}

/// The state a plan that provisions nothing is in.
pub fn unprovisioned_state(plan: &PostgresPlan) -> Option<PostgresState> {
    match plan {
        PostgresPlan::Embedded => Some(PostgresState::Embedded),
        PostgresPlan::Existing(_) => Some(PostgresState::Ready),
        PostgresPlan::Admin { .. } => None,
        PostgresPlan::Unusable {
            reason, message, ..
        } => Some(PostgresState::Failed {
            reason: reason.clone(),
            message: message.clone(),
        }),
    }
}

/// Ok when the Job completed, Err(reason) when it failed, None while it runs.
fn job_state(job: &Job) -> ReindexJob {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map_or(&[][..], Vec::as_slice);
    for c in conditions {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => return ReindexJob::Succeeded,
            "Failed" => {
                return ReindexJob::Failed(
                    c.reason
                        .clone()
                        .or_else(|| c.message.clone())
                        .unwrap_or_else(|| "Failed".to_owned()),
                );
            }
            _ => {}
        }
    }
    ReindexJob::Running
}

/// Every Secret the pods mount or read that is missing (or lacks its key).
async fn missing_secrets(client: &Client, c: &ValidatedCache) -> Result<Vec<String>, ObserveError> {
    let mut references: Vec<(String, Option<String>, String)> = c
        .tenants
        .iter()
        .map(|t| {
            (
                t.api_key_secret.name.clone(),
                Some(t.api_key_secret.key.clone()),
                format!("tenant {}", t.name),
            )
        })
        .collect();
    if let Some(k) = &c.embedding.api_key_secret {
        references.push((k.name.clone(), Some(k.key.clone()), "the embedder".into()));
    }
    for v in &c.verifiers {
        if let Some(k) = &v.api_key_secret {
            references.push((
                k.name.clone(),
                Some(k.key.clone()),
                format!("verifier {}", v.name),
            ));
        }
    }
    for u in &c.upstreams {
        if let Some(k) = &u.api_key_secret {
            references.push((
                k.name.clone(),
                Some(k.key.clone()),
                format!("upstream {}", u.name),
            ));
        }
    }
    if let Some(b) = &c.backup {
        references.push((b.credentials_secret.name.clone(), None, "backups".into()));
    }
    let mut missing = Vec::new();
    for (name, key, user) in references {
        let secret = read_secret(client, &c.namespace, &name).await?;
        let present = match (&secret, &key) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(s), Some(k)) => s.data.as_ref().is_some_and(|d| d.contains_key(k)),
        };
        if !present {
            missing.push(match key {
                Some(k) => format!("Secret {name} (key {k}, {user})"),
                None => format!("Secret {name} ({user})"),
            });
        }
    }
    Ok(missing)
}

pub async fn observe(
    client: &Client,
    c: &ValidatedCache,
    previous: &SemanticCacheStatus,
) -> Result<Facts, ObserveError> {
    let ns = &c.namespace;
    let names = child_names(&c.name);
    let redis_password = match read_secret(client, ns, &names.redis).await? {
        Some(s) => secret_value(&s, "password").unwrap_or_else(generate_password),
        None => generate_password(),
    };
    let postgres = postgres_plan(client, c).await?;

    let (mut reindex_job, mut dataplane) = (ReindexJob::Absent, None);
    if index::migration_wanted(c, previous.active_index.as_ref()) {
        let job_name = reindex_job_name(&c.name, &c.embedder);
        reindex_job = Api::<Job>::namespaced(client.clone(), ns)
            .get_opt(&job_name)
            .await
            .map_err(kube_err(format!("read Job {job_name}")))?
            .as_ref()
            .map_or(ReindexJob::Absent, job_state);
        dataplane = Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(&names.dataplane)
            .await
            .map_err(kube_err(format!("read Deployment {}", names.dataplane)))?
            .map(|d| RunningDataplane {
                config_hash: d
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref())
                    .and_then(|m| m.annotations.as_ref())
                    .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
                    .cloned(),
                rolled_out: deployment_rollout(d).done(),
            });
    }

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let service_monitor_crd = c.service_monitor
        && crds
            .get_opt("servicemonitors.monitoring.coreos.com")
            .await
            .map_err(kube_err("look up the ServiceMonitor CRD"))?
            .is_some();

    Ok(Facts {
        redis_password,
        postgres,
        reindex_job,
        dataplane,
        service_monitor_crd,
        missing_secrets: missing_secrets(client, c).await?,
    })
}

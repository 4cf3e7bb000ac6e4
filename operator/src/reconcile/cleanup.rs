//! Deletion, behind the `semantis.dev/cleanup` finalizer: children go with their owner
//! reference (garbage collection); what the API server cannot clean up is the Postgres role
//! and database created in admin mode with `deletionPolicy: Delete`.

use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::Context;
use super::events::publish;
use super::observe::{self, ObserveError};
use crate::crd::{DeletionPolicy, SemanticCache};
use crate::postgres::{self, PostgresError};
use crate::validate::{self, PostgresSource};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    Read(#[from] ObserveError),
    #[error("failed to drop the Postgres database: Secret {name}: {message}")]
    AdminSecret { name: String, message: String },
    #[error("failed to drop the Postgres database: {0}")]
    Postgres(#[from] PostgresError),
}

pub async fn cleanup(cache: Arc<SemanticCache>, ctx: Arc<Context>) -> Result<Action, CleanupError> {
    ctx.metrics.observe_cache(
        &cache.namespace().unwrap_or_default(),
        &cache.name_any(),
        None,
    );
    let Ok(valid) = validate::validate(&cache, &ctx.defaults) else {
        return Ok(Action::await_change());
    };
    if let Some(pg) = &valid.postgres
        && let PostgresSource::Admin(admin_secret) = &pg.source
        && pg.deletion_policy == DeletionPolicy::Delete
    {
        let secret =
            observe::read_secret(&ctx.client, &valid.namespace, &admin_secret.name).await?;
        let admin =
            match observe::admin_login(secret.as_ref(), &admin_secret.name, &pg.host, pg.port) {
                Ok(admin) => admin,
                Err((reason, _)) => {
                    return Err(CleanupError::AdminSecret {
                        name: admin_secret.name.clone(),
                        message: if reason == "AdminSecretMissing" {
                            "the admin Secret is gone; cannot drop the database".into()
                        } else {
                            "needs username and password keys".into()
                        },
                    });
                }
            };
        postgres::drop_spawned(admin, pg.managed_role(), pg.database.clone()).await?;
        publish(
            &ctx,
            &cache,
            EventType::Normal,
            "PostgresDropped",
            format!(
                "dropped database {} and role {}",
                pg.database,
                pg.managed_role()
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}

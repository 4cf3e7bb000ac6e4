//! Deletion, behind the `semantis.dev/cleanup` finalizer: children go with their owner
//! reference (garbage collection); what the API server cannot clean up is the Postgres role
//! and database created in admin mode with `deletionPolicy: Delete`.

use std::sync::Arc;
use std::time::Duration;

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
    #[error("failed to drop the Postgres database: {0}")]
    Postgres(#[from] PostgresError),
}

/// How long a deletion retries dropping the database (Postgres unreachable, refusing) before
/// it finishes anyway and says what it left behind: a finalizer must not hold a namespace
/// deletion forever.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

pub async fn cleanup(cache: Arc<SemanticCache>, ctx: Arc<Context>) -> Result<Action, CleanupError> {
    ctx.metrics.observe_cache(
        &cache.namespace().unwrap_or_default(),
        &cache.name_any(),
        None,
    );
    // Only the Postgres part matters here: the rest of the spec may be invalid by now.
    let pg = match validate::postgres(&cache) {
        Ok(Some(pg)) => pg,
        Ok(None) => return Ok(Action::await_change()),
        Err(invalid) => {
            let note = format!(
                "nothing dropped in Postgres: {} is invalid ({}); drop the cache's database and role by hand if it had any",
                invalid.field, invalid.message
            );
            publish(&ctx, &cache, EventType::Warning, "CleanupSkipped", note).await;
            return Ok(Action::await_change());
        }
    };
    let PostgresSource::Admin(admin_secret) = &pg.source else {
        return Ok(Action::await_change());
    };
    if pg.deletion_policy != DeletionPolicy::Delete {
        return Ok(Action::await_change());
    }
    // Finish the deletion anyway, saying what stays in Postgres and why.
    let leave_behind = |why: String| {
        let note = format!(
            "left database {} and role {} in Postgres {}:{}: {why}",
            pg.database,
            pg.managed_role(),
            pg.host,
            pg.port
        );
        let (ctx, cache) = (ctx.clone(), cache.clone());
        async move {
            publish(&ctx, &cache, EventType::Warning, "PostgresLeftBehind", note).await;
            Ok(Action::await_change())
        }
    };
    let namespace = cache.namespace().unwrap_or_default();
    let secret = observe::read_secret(&ctx.client, &namespace, &admin_secret.name).await?;
    let admin = match observe::admin_login(secret.as_ref(), &admin_secret.name, &pg.host, pg.port) {
        Ok(admin) => admin,
        Err((reason, _)) => {
            // Nothing to wait for: the Secret went with the namespace, or never had the keys.
            let why = if reason == "AdminSecretMissing" {
                format!("the admin Secret {} is gone", admin_secret.name)
            } else {
                format!(
                    "the admin Secret {} has no username and password keys",
                    admin_secret.name
                )
            };
            return leave_behind(why).await;
        }
    };
    let owner = format!("{namespace}/{}", cache.name_any());
    match postgres::drop_spawned(admin, pg.managed_role(), pg.database.clone(), owner).await {
        Ok(()) => {
            let note = format!(
                "dropped database {} and role {}",
                pg.database,
                pg.managed_role()
            );
            publish(&ctx, &cache, EventType::Normal, "PostgresDropped", note).await;
            Ok(Action::await_change())
        }
        Err(e @ PostgresError::NotOurs { .. }) => leave_behind(e.to_string()).await,
        Err(e) if deleting_for(&cache) >= GIVE_UP_AFTER => {
            leave_behind(format!(
                "still failing after {} s: {e}",
                GIVE_UP_AFTER.as_secs()
            ))
            .await
        }
        Err(e) => Err(e.into()),
    }
}

/// How long ago the deletion was asked for.
fn deleting_for(cache: &SemanticCache) -> Duration {
    cache
        .metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| {
            let since = jiff::Timestamp::now().duration_since(t.0);
            Duration::try_from(since).ok()
        })
        .unwrap_or_default()
}

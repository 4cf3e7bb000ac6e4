//! Index versions on disk and in the metadata store: the one "prepare a migration target"
//! that `serve` (dual writes) and `reindex` (the copy) both run, after the life cycle in
//! `semantis_cache::index_version`.

use semantis_cache::index_version::{IndexVersionState, TargetPreparation, target_preparation};

use super::BackendError;
use super::lance::table_name;
use super::metadata::MetadataStore;

/// Make the target version ready to be filled: record it as `building`, or, when it was
/// retired or deleted earlier (a migration back), drop its stale table and start it over.
/// Returns the state it is in afterwards (`ready` or `active`: nothing to build).
pub async fn prepare_target(
    db: &lancedb::Connection,
    metadata: &MetadataStore,
    tenant: &str,
    fingerprint: &str,
    dimension: usize,
    now_ms: i64,
) -> Result<IndexVersionState, BackendError> {
    let state = metadata.version_state(tenant, fingerprint).await?;
    match target_preparation(state) {
        TargetPreparation::Done | TargetPreparation::Continue => {
            return Ok(state.unwrap_or(IndexVersionState::Building));
        }
        TargetPreparation::StartOver => {
            let stale = table_name(tenant, fingerprint);
            match db.drop_table(&stale, &[]).await {
                Ok(()) | Err(lancedb::Error::TableNotFound { .. }) => {}
                Err(source) => {
                    return Err(BackendError::Lance {
                        action: "drop the stale table of a restarted migration target",
                        table: stale,
                        source: Box::new(source),
                    });
                }
            }
        }
        TargetPreparation::Create => {}
    }
    metadata
        .set_index_version(
            tenant,
            fingerprint,
            dimension,
            IndexVersionState::Building,
            now_ms,
        )
        .await?;
    Ok(IndexVersionState::Building)
}

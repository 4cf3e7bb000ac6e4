//! The resident index's life cycle: loaded from the table in the background, fed every log
//! record meanwhile, searched once complete, dropped (back to LanceDB) when an update fails.

use std::sync::{Arc, Weak};
use std::time::Instant;

use futures::TryStreamExt;

use super::LanceEntryStore;
use crate::store::BackendError;
use crate::store::resident::{ResidentError, ResidentIndex};

impl LanceEntryStore {
    /// Start filling the resident index from the table, in the background. The caller starts
    /// it once startup's own reads are done: on one core the load (which reads every vector
    /// and builds the graphs) would otherwise slow readiness down threefold.
    pub fn start_resident_load(self: &Arc<Self>) {
        if let Some(resident) = &self.resident {
            let generation = resident.load_generation();
            Self::spawn_resident_load(Arc::downgrade(self), resident.clone(), generation);
        }
    }

    /// Fill the resident index from the table in the background. Log records applied
    /// meanwhile go to it directly; until it is ready, searches go to LanceDB.
    pub(super) fn spawn_resident_load(
        store: Weak<Self>,
        resident: Arc<ResidentIndex>,
        generation: u64,
    ) {
        tokio::spawn(async move {
            let started = Instant::now();
            let result = match store.upgrade() {
                Some(me) => me.load_resident(&resident, generation).await,
                None => return,
            };
            let Some(me) = store.upgrade() else { return };
            match result {
                // A newer load started meanwhile: it reports for itself.
                Ok(()) if !resident.finish_load(generation) => {}
                Err(_) if resident.load_generation() != generation => {}
                Ok(()) => {
                    me.metrics
                        .resident_entries
                        .with_label_values(&[&me.tenant])
                        .set(i64::try_from(resident.len()).unwrap_or(i64::MAX));
                    tracing::info!(
                        table = %me.table.name(),
                        entries = resident.len(),
                        seconds = started.elapsed().as_secs_f64(),
                        "resident index loaded; semantic lookups no longer query LanceDB"
                    );
                }
                Err(e) => {
                    // Incomplete, so never searched: free it.
                    resident.disable();
                    tracing::warn!(
                        table = %me.table.name(),
                        error = %e,
                        "failed to load the resident index; semantic lookups keep querying LanceDB"
                    );
                }
            }
        });
    }

    async fn load_resident(
        &self,
        resident: &Arc<ResidentIndex>,
        generation: u64,
    ) -> Result<(), BackendError> {
        let mut stream = Box::pin(self.table.scan(None).await?);
        while let Some(entries) = stream.try_next().await? {
            if resident.load_generation() != generation {
                return Ok(());
            }
            let resident = resident.clone();
            // Graph inserts are CPU work: keep them off the request workers.
            tokio::task::spawn_blocking(move || {
                entries
                    .into_iter()
                    .try_for_each(|e| resident.insert_loaded(generation, Arc::new(e)))
            })
            .await
            .map_err(|e| BackendError::Decode {
                table: self.table.name().to_owned(),
                reason: format!("failed to load the resident index: {e}"),
            })??;
        }
        // Ready means every graph is built: until then LanceDB answers, not a scan of
        // everything pending.
        let resident = resident.clone();
        tokio::task::spawn_blocking(move || resident.index_all_pending())
            .await
            .map_err(|e| BackendError::Decode {
                table: self.table.name().to_owned(),
                reason: format!("failed to load the resident index: {e}"),
            })??;
        Ok(())
    }

    /// The resident index, when it holds everything.
    pub(super) fn resident_ready(&self) -> Option<&ResidentIndex> {
        self.resident.as_deref().filter(|r| r.ready())
    }

    /// Apply a log record to the resident index. A failure there must not fail a write
    /// that is already durable: the index is dropped and searches go back to LanceDB.
    pub(super) fn apply_resident(
        &self,
        f: impl FnOnce(&ResidentIndex) -> Result<(), ResidentError>,
    ) {
        if let Some(resident) = &self.resident
            && !resident.disabled()
            && let Err(e) = f(resident)
        {
            resident.disable();
            tracing::error!(table = %self.table.name(), error = %e, "failed to update the resident index; semantic lookups query LanceDB from now on");
        }
    }
}

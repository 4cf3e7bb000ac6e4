//! One LanceDB entry table: the only code that talks to LanceDB about entries. The serving
//! store, `reindex` and `backup` all go through [`Table`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{RecordBatch, RecordBatchIterator};
use arrow_schema::SchemaRef;
use futures::TryStreamExt;
use lancedb::DistanceType;
use lancedb::index::Index;
use lancedb::index::scalar::BTreeIndexBuilder;
use lancedb::index::vector::IvfPqIndexBuilder;
use lancedb::query::{ExecutableQuery, QueryBase, Select};
use lancedb::table::{OptimizeAction, OptimizeOptions};
use semantis_cache::entry::{Entry, Held, Removed};
use semantis_contract::StorageConfig;

use super::{codec, sql};
use crate::store::BackendError;

/// The ANN index's name.
const VECTOR_INDEX: &str = "vector_idx";
/// The columns with a B-tree index (lookups and deletes filter on them); LanceDB names each
/// index `<column>_idx`.
const SCALAR_COLUMNS: [&str; 3] = ["exact_key", "id", "scope"];
const ID_INDEX: &str = "id_idx";
/// Deletes and lookups by id go in chunks of this many ids (one SQL predicate each).
const ID_CHUNK: usize = 512;

/// The LanceDB table of one (tenant, index version).
pub fn table_name(tenant: &str, fingerprint: &str) -> String {
    format!("{tenant}--{}", &fingerprint[..fingerprint.len().min(16)])
}

/// Where the files of table `name` live under the LanceDB root directory.
pub fn table_dir(lance_root: &Path, name: &str) -> PathBuf {
    lance_root.join(format!("{name}.lance"))
}

/// Which indexes a table has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Indexes {
    pub vector: bool,
    pub scalar: bool,
}

/// The files that make up one version of a table, relative to its directory.
pub struct VersionFiles {
    pub dir: PathBuf,
    /// Data, deletion and index files present when listed. A compaction may prune one of an
    /// older version meanwhile; the version's manifest never names those.
    pub data: Vec<PathBuf>,
    /// The version's manifest: without it the copy does not open.
    pub manifest: PathBuf,
}

/// A handle to one entry table.
pub struct Table {
    name: String,
    inner: lancedb::Table,
    schema: SchemaRef,
}

impl Table {
    /// Open `name`, creating it empty when missing, and check it holds `dimension`-sized
    /// vectors.
    pub async fn open(
        db: &lancedb::Connection,
        name: &str,
        dimension: usize,
    ) -> Result<Self, BackendError> {
        let schema = codec::schema(dimension);
        let err = |action| lance_error(name, action);
        let inner = match db.open_table(name).execute().await {
            Ok(t) => t,
            Err(lancedb::Error::TableNotFound { .. }) => {
                match db.create_empty_table(name, schema.clone()).execute().await {
                    Ok(t) => t,
                    // Another replica (or `reindex`) created it first.
                    Err(lancedb::Error::TableAlreadyExists { .. }) => {
                        db.open_table(name).execute().await.map_err(err("open"))?
                    }
                    Err(e) => return Err(err("create")(e)),
                }
            }
            Err(e) => return Err(err("open")(e)),
        };
        let found = inner.schema().await.map_err(err("read the schema of"))?;
        let found = found
            .field_with_name("vector")
            .map(|f| f.data_type().clone());
        if found.ok().as_ref() != schema.field_with_name("vector").ok().map(|f| f.data_type()) {
            return Err(BackendError::Decode {
                table: name.to_owned(),
                reason: format!(
                    "the table's vector column does not hold {dimension}-dimensional vectors"
                ),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            inner,
            schema,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, action: &'static str) -> impl FnOnce(lancedb::Error) -> BackendError + use<> {
        lance_error(&self.name, action)
    }

    fn decode_err(&self) -> impl FnOnce(String) -> BackendError + use<> {
        let table = self.name.clone();
        move |reason| BackendError::Decode { table, reason }
    }

    /// Move to the table's latest version: another replica or `reindex` may have committed
    /// since, and a commit on a stale version is refused as a conflict.
    pub async fn refresh(&self) -> Result<(), BackendError> {
        self.inner
            .checkout_latest()
            .await
            .map_err(self.err("check out the latest version of"))
    }

    /// The version this handle reads.
    pub async fn version(&self) -> Result<u64, BackendError> {
        self.inner
            .version()
            .await
            .map_err(self.err("read the version of"))
    }

    pub async fn indexes(&self) -> Result<Indexes, BackendError> {
        let indices = self
            .inner
            .list_indices()
            .await
            .map_err(self.err("list indices of"))?;
        Ok(Indexes {
            vector: indices.iter().any(|i| i.name == VECTOR_INDEX),
            scalar: indices.iter().any(|i| i.columns == ["exact_key"]),
        })
    }

    /// Rows matching `filter` (all rows without one).
    pub async fn count(&self, filter: Option<String>) -> Result<usize, BackendError> {
        self.inner
            .count_rows(filter)
            .await
            .map_err(self.err("count rows of"))
    }

    pub async fn count_live(&self, now_ms: i64) -> Result<u64, BackendError> {
        Ok(self.count(Some(sql::live(now_ms))).await? as u64)
    }

    async fn collect(
        &self,
        stream: Result<lancedb::arrow::SendableRecordBatchStream, lancedb::Error>,
    ) -> Result<Vec<RecordBatch>, BackendError> {
        stream
            .map_err(self.err("query"))?
            .try_collect()
            .await
            .map_err(self.err("read"))
    }

    /// Up to `limit` entries matching `filter`.
    pub async fn entries(
        &self,
        filter: String,
        limit: Option<usize>,
    ) -> Result<Vec<Entry>, BackendError> {
        let mut q = self.inner.query().only_if(filter);
        if let Some(limit) = limit {
            q = q.limit(limit);
        }
        let mut out = Vec::new();
        for b in &self.collect(q.execute().await).await? {
            out.extend(codec::decode(b).map_err(self.decode_err())?);
        }
        Ok(out)
    }

    /// Id and exact key of up to `limit` rows matching `filter`.
    pub async fn removed(
        &self,
        filter: String,
        limit: Option<usize>,
    ) -> Result<Vec<Removed>, BackendError> {
        let mut q = self
            .inner
            .query()
            .only_if(filter)
            .select(Select::columns(&codec::REMOVED_COLUMNS));
        if let Some(limit) = limit {
            q = q.limit(limit);
        }
        let mut out = Vec::new();
        for b in &self.collect(q.execute().await).await? {
            codec::decode_removed(b, &mut out).map_err(self.decode_err())?;
        }
        Ok(out)
    }

    /// Id and creation time of every row matching `filter` (all rows without one).
    pub async fn ids(&self, filter: Option<String>) -> Result<Vec<(String, i64)>, BackendError> {
        let mut q = self
            .inner
            .query()
            .select(Select::columns(&codec::ID_COLUMNS));
        if let Some(filter) = filter {
            q = q.only_if(filter);
        }
        let mut out = Vec::new();
        for b in &self.collect(q.execute().await).await? {
            codec::decode_ids(b, &mut out).map_err(self.decode_err())?;
        }
        Ok(out)
    }

    /// Id, creation time and footprint of every row matching `filter`, for vectors of
    /// `dimension` (lengths come from the columns' offsets; no value is copied).
    pub async fn held(&self, filter: String, dimension: usize) -> Result<Vec<Held>, BackendError> {
        let q = self
            .inner
            .query()
            .only_if(filter)
            .select(Select::columns(&codec::HELD_COLUMNS));
        let mut out = Vec::new();
        for b in &self.collect(q.execute().await).await? {
            codec::decode_held(b, dimension, &mut out).map_err(self.decode_err())?;
        }
        Ok(out)
    }

    /// Stream the entries matching `filter` (all without one), a batch at a time: memory
    /// stays bounded by LanceDB's batch size, not the table's.
    pub async fn scan(
        &self,
        filter: Option<String>,
    ) -> Result<impl futures::Stream<Item = Result<Vec<Entry>, BackendError>> + use<>, BackendError>
    {
        let mut q = self.inner.query();
        if let Some(filter) = filter {
            q = q.only_if(filter);
        }
        let stream = q.execute().await.map_err(self.err("query"))?;
        let name = self.name.clone();
        Ok(futures::StreamExt::map(stream, move |batch| {
            let batch = batch.map_err(lance_error(&name, "read"))?;
            codec::decode(&batch).map_err(|reason| BackendError::Decode {
                table: name.clone(),
                reason,
            })
        }))
    }

    /// The `limit` rows matching `filter` nearest to `vector` by cosine distance. With an ANN
    /// index, candidates are re-ranked on the full vectors before they are returned.
    pub async fn nearest(
        &self,
        vector: &[f32],
        filter: String,
        limit: usize,
        ann: bool,
    ) -> Result<Vec<Entry>, BackendError> {
        let mut query = self
            .inner
            .vector_search(vector.to_vec())
            .map_err(self.err("search"))?
            .column("vector")
            .distance_type(DistanceType::Cosine)
            .only_if(filter)
            .limit(limit);
        if ann {
            query = query
                .refine_factor(10)
                .nprobes(32)
                .map_err(self.err("search"))?;
        }
        let mut out = Vec::new();
        for b in &self.collect(query.execute().await).await? {
            out.extend(codec::decode(b).map_err(self.decode_err())?);
        }
        Ok(out)
    }

    /// Append entries as new rows.
    pub async fn append(&self, entries: &[Arc<Entry>]) -> Result<(), BackendError> {
        let rb = codec::encode(&self.schema, entries).map_err(self.decode_err())?;
        self.inner
            .add(rb)
            .execute()
            .await
            .map_err(self.err("append to"))?;
        Ok(())
    }

    /// Insert the entries whose id is not in the table yet (idempotent).
    pub async fn merge(&self, entries: &[Arc<Entry>]) -> Result<(), BackendError> {
        if entries.is_empty() {
            return Ok(());
        }
        let rb = codec::encode(&self.schema, entries).map_err(self.decode_err())?;
        let reader = RecordBatchIterator::new(vec![Ok(rb)], self.schema.clone());
        let mut merge = self.inner.merge_insert(&["id"]);
        merge.when_not_matched_insert_all();
        merge
            .execute(Box::new(reader))
            .await
            .map_err(self.err("merge into"))?;
        Ok(())
    }

    /// [`Self::merge`] onto the latest version (a writer outside the serving replicas).
    pub async fn merge_latest(&self, entries: &[Arc<Entry>]) -> Result<(), BackendError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.refresh().await?;
        self.merge(entries).await
    }

    /// Delete the rows `predicate` matches.
    pub async fn delete(&self, predicate: &str) -> Result<(), BackendError> {
        self.inner
            .delete(predicate)
            .await
            .map_err(self.err("delete from"))?;
        Ok(())
    }

    pub async fn delete_ids(&self, ids: &[String]) -> Result<(), BackendError> {
        for chunk in ids.chunks(ID_CHUNK) {
            self.delete(&sql::ids_in(chunk)).await?;
        }
        Ok(())
    }

    /// Make every id appear once. A merge racing another merge of the same new id (a serving
    /// replica's flush and `reindex`) can commit both rows; keep one of them.
    pub async fn dedupe(&self) -> Result<usize, BackendError> {
        self.refresh().await?;
        let mut seen = HashSet::new();
        let dupes: Vec<String> = self
            .ids(None)
            .await?
            .into_iter()
            .filter_map(|(id, _)| (!seen.insert(id.clone())).then_some(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if dupes.is_empty() {
            return Ok(0);
        }
        let mut keep: Vec<Arc<Entry>> = Vec::new();
        for chunk in dupes.chunks(ID_CHUNK) {
            let mut once = HashSet::new();
            keep.extend(
                self.entries(sql::ids_in(chunk), None)
                    .await?
                    .into_iter()
                    .filter(|e| once.insert(e.id.clone()))
                    .map(Arc::new),
            );
        }
        self.delete_ids(&dupes).await?;
        self.merge_latest(&keep).await?;
        Ok(dupes.len())
    }

    /// Rewrite small fragments into large ones.
    pub async fn compact(&self) -> Result<(), BackendError> {
        self.inner
            .optimize(OptimizeAction::Compact {
                options: Default::default(),
                remap_options: None,
            })
            .await
            .map_err(self.err("compact"))?;
        Ok(())
    }

    /// Delete the files of versions older than `older_than_secs`.
    pub async fn prune(&self, older_than_secs: u64) -> Result<(), BackendError> {
        self.inner
            .optimize(OptimizeAction::Prune {
                older_than: lancedb::table::Duration::try_seconds(
                    i64::try_from(older_than_secs).unwrap_or(i64::MAX),
                ),
                delete_unverified: None,
                error_if_tagged_old_versions: None,
            })
            .await
            .map_err(self.err("prune old versions of"))?;
        Ok(())
    }

    /// Bring every index up to date with the rows added since it was built.
    pub async fn update_indexes(&self) -> Result<(), BackendError> {
        self.inner
            .optimize(OptimizeAction::Index(OptimizeOptions::default()))
            .await
            .map_err(self.err("update the indexes of"))?;
        Ok(())
    }

    /// Bring the B-tree indexes up to date, leaving the ANN index to its own schedule (its
    /// update costs far more).
    pub async fn update_scalar_indexes(&self) -> Result<(), BackendError> {
        let options = OptimizeOptions::new()
            .index_names(SCALAR_COLUMNS.iter().map(|c| format!("{c}_idx")).collect());
        self.inner
            .optimize(OptimizeAction::Index(options))
            .await
            .map_err(self.err("update the scalar indexes of"))?;
        Ok(())
    }

    /// Rows the ANN index does not cover yet (`None` without one).
    pub async fn unindexed_rows(&self) -> Result<Option<usize>, BackendError> {
        self.unindexed_rows_of(VECTOR_INDEX).await
    }

    /// Rows the B-tree index on `id` does not cover yet (`None` without one): a read by id
    /// scans them.
    pub async fn unindexed_ids(&self) -> Result<Option<usize>, BackendError> {
        self.unindexed_rows_of(ID_INDEX).await
    }

    async fn unindexed_rows_of(&self, index: &str) -> Result<Option<usize>, BackendError> {
        let stats = self
            .inner
            .index_stats(index)
            .await
            .map_err(self.err("read index statistics of"))?;
        Ok(stats.map(|s| s.num_unindexed_rows))
    }

    /// B-tree indexes on the columns lookups and deletes filter on.
    pub async fn create_scalar_indexes(&self) -> Result<(), BackendError> {
        for column in SCALAR_COLUMNS {
            self.inner
                .create_index(&[column], Index::BTree(BTreeIndexBuilder::default()))
                .replace(true)
                .execute()
                .await
                .map_err(self.err("build a scalar index on"))?;
        }
        Ok(())
    }

    /// (Re)build the ANN index over `rows` rows.
    pub async fn create_vector_index(&self, rows: usize) -> Result<(), BackendError> {
        // About sqrt(rows) partitions, as LanceDB recommends; PQ with 8-dim sub-vectors.
        let partitions = ((rows as f64).sqrt() as u32).clamp(1, 4096);
        let dim = u32::try_from(codec::dimension_of(&self.schema)).unwrap_or(8);
        self.inner
            .create_index(
                &["vector"],
                Index::IvfPq(
                    IvfPqIndexBuilder::default()
                        .distance_type(DistanceType::Cosine)
                        .num_partitions(partitions)
                        .num_sub_vectors((dim / 8).max(1)),
                ),
            )
            .name(VECTOR_INDEX.to_owned())
            .replace(true)
            .execute()
            .await
            .map_err(self.err("build the vector index of"))?;
        tracing::info!(table = %self.name, rows, partitions, "built the vector index");
        Ok(())
    }

    /// Compact, then scalar indexes always and the ANN index once the table holds
    /// `index_min_rows`. Returns whether the ANN index exists afterwards.
    pub async fn build_indexes(&self, cfg: &StorageConfig) -> Result<bool, BackendError> {
        self.refresh().await?;
        let rows = self.count(None).await?;
        if rows == 0 {
            return Ok(false);
        }
        self.compact().await?;
        self.create_scalar_indexes().await?;
        if rows >= cfg.index_min_rows {
            self.create_vector_index(rows).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The files of the version this handle reads, under `lance_root`: its manifest and
    /// every other file present now. Older manifests are left out, so a copy of these files
    /// opens at exactly this version.
    pub async fn version_files(&self, lance_root: &Path) -> Result<VersionFiles, BackendError> {
        let version = self.version().await?;
        let dir = table_dir(lance_root, &self.name);
        version_files(&dir, version).map_err(|e| match e {
            FilesError::Io(source) => BackendError::Io {
                action: "list the files of table directory",
                path: dir.display().to_string(),
                source,
            },
            FilesError::NoManifest => BackendError::Decode {
                table: self.name.clone(),
                reason: format!(
                    "failed to find the manifest of version {version} in {}",
                    dir.display()
                ),
            },
        })
    }
}

enum FilesError {
    Io(std::io::Error),
    NoManifest,
}

/// The files of `version` in table directory `dir`. Lance keeps a version's manifest in
/// `_versions/`, named `{version}` or, in its newer scheme, `{u64::MAX - version}`; every
/// other file (data, deletions, indexes) may belong to it.
fn version_files(dir: &Path, version: u64) -> Result<VersionFiles, FilesError> {
    let mut data = Vec::new();
    let mut manifest = None;
    for path in walk(dir).map_err(FilesError::Io)? {
        let Ok(rel) = path.strip_prefix(dir).map(Path::to_path_buf) else {
            continue;
        };
        if rel.starts_with("_versions") {
            let stem = rel
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".manifest"))
                .and_then(|n| n.parse::<u64>().ok());
            if stem.is_some_and(|n| n == version || u64::MAX - n == version) {
                manifest = Some(rel);
            }
            continue;
        }
        data.push(rel);
    }
    Ok(VersionFiles {
        dir: dir.to_owned(),
        data,
        manifest: manifest.ok_or(FilesError::NoManifest)?,
    })
}

fn lance_error(
    table: &str,
    action: &'static str,
) -> impl FnOnce(lancedb::Error) -> BackendError + use<> {
    let table = table.to_owned();
    move |source| BackendError::Lance {
        action,
        table,
        source: Box::new(source),
    }
}

/// Every file under `dir`, sorted. A directory pruned while listed is skipped: nothing of the
/// version being listed lived there.
fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_its_data_plus_exactly_its_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path();
        for f in [
            "_versions/1.manifest",
            "_versions/2.manifest",
            "_versions/3.manifest",
            "data/a.lance",
            "_indices/x/index.idx",
        ] {
            std::fs::create_dir_all(t.join(f).parent().expect("parent")).expect("mkdir");
            std::fs::write(t.join(f), b"x").expect("write");
        }
        let Ok(files) = version_files(t, 2) else {
            panic!("version 2 has a manifest");
        };
        let names: Vec<String> = files.data.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(names, ["_indices/x/index.idx", "data/a.lance"]);
        assert_eq!(files.manifest, Path::new("_versions/2.manifest"));
        // Lance's newer naming counts down from u64::MAX.
        let v7 = format!("_versions/{:020}.manifest", u64::MAX - 7);
        std::fs::write(t.join(&v7), b"x").expect("write");
        let Ok(files) = version_files(t, 7) else {
            panic!("version 7 has a manifest");
        };
        assert_eq!(files.manifest, Path::new(&v7));
        assert!(
            matches!(version_files(t, 9), Err(FilesError::NoManifest)),
            "a version without a manifest is an error"
        );
    }

    #[test]
    fn table_names_and_directories() {
        assert_eq!(
            table_name("acme", "0123456789abcdef0123"),
            "acme--0123456789abcdef"
        );
        assert_eq!(
            table_dir(Path::new("lance"), "acme--01"),
            Path::new("lance/acme--01.lance")
        );
    }
}

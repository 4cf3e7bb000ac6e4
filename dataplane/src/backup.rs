//! `backup` and `restore`: a cache's LanceDB tables and metadata to and from S3.
//!
//! Layout under `s3://BUCKET/PREFIX/`: one folder per backup, named by its UTC time
//! (`20261123T225834123Z-1a2b3c`), holding `lance/<table>.lance/...` (the files of each tenant's
//! active table version), `metadata.json` (every metadata row) and, uploaded last,
//! `manifest.json` (sizes and SHA-256 of every other object). A folder without a manifest is
//! an interrupted backup: restore never picks it and retention deletes it.
//!
//! Consistency: LanceDB files are immutable once written and a table version is a manifest
//! naming them, so copying the latest version's manifest and the data files present when it
//! was read is a consistent snapshot even while the server writes. Entries still in a
//! server's write-ahead tail (the last flush interval) are not in the table yet, so not in the
//! backup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use semantis_cache::tenants::TenantRegistry;
use semantis_cache::vector::now_ms;
use semantis_dataplane::store::lance::{Table, table_dir, table_name};
use semantis_dataplane::store::metadata::MetadataSnapshot;

use crate::serve::open_metadata;

const MANIFEST: &str = "manifest.json";
const METADATA: &str = "metadata.json";
const FORMAT: u32 = 1;

#[derive(clap::Args)]
pub struct BackupArgs {
    /// The dataplane's configuration file (data directory, metadata store, tenants).
    #[arg(long, short, env = "SEMANTIS_CONFIG")]
    config: Option<PathBuf>,
    /// Destination, `s3://BUCKET/PREFIX`. Endpoint, region and credentials come from the
    /// standard AWS environment variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...).
    #[arg(long)]
    to: String,
    /// Afterwards keep only the newest N complete backups under the prefix.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    keep: Option<u64>,
    /// Afterwards keep backups newer than this (`7d`, `36h`); with --keep, a backup stays when
    /// either keeps it.
    #[arg(long, value_parser = humantime::parse_duration)]
    keep_within: Option<Duration>,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The dataplane's configuration file; its stores must be empty.
    #[arg(long, short, env = "SEMANTIS_CONFIG")]
    config: Option<PathBuf>,
    /// Where the backups are, `s3://BUCKET/PREFIX`.
    #[arg(long)]
    from: String,
    /// Which backup (its folder name); the newest complete one when omitted.
    #[arg(long)]
    backup: Option<String>,
    /// Do nothing (and succeed) when the metadata store already records tenants, instead of
    /// refusing: what the operator's bootstrap init container runs at every pod start, so only
    /// the first start of a new cache restores.
    #[arg(long)]
    if_empty: bool,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(clap::Args)]
struct S3Args {
    /// Path-style addressing (`endpoint/bucket/key`), as MinIO and most S3-compatible servers
    /// want. Defaults to on when AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) is set.
    #[arg(long, env = "AWS_S3_FORCE_PATH_STYLE")]
    path_style: Option<bool>,
    /// Files larger than this many MiB go up in multipart uploads of this part size.
    #[arg(long, default_value_t = 16)]
    part_size_mib: usize,
    /// One S3 request (an object, or one part of a multipart upload) that has not finished
    /// after this many seconds is abandoned and retried (the SDK's standard retries, 3
    /// attempts); then the command fails. Without it a server that stops answering, with the
    /// connection left open, would hang the backup Job forever.
    #[arg(long, env = "SEMANTIS_S3_ATTEMPT_TIMEOUT_SECS", default_value_t = 300)]
    s3_attempt_timeout_secs: u64,
}

/// `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    id: String,
    created_at_ms: i64,
    dataplane_version: String,
    /// tenant → (fingerprint, table)
    tables: BTreeMap<String, (String, String)>,
    /// Every object of the backup but the manifest, by key relative to the backup folder.
    files: BTreeMap<String, FileSum>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileSum {
    size: u64,
    sha256: String,
}

struct Location {
    bucket: String,
    prefix: String,
}

impl Location {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("s3://")
            .with_context(|| format!("failed to parse `{url}`: expected s3://BUCKET/PREFIX"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        ensure!(
            !bucket.is_empty(),
            "failed to parse `{url}`: the bucket is empty"
        );
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }

    /// The key of `rel` inside backup `id`.
    fn key(&self, id: &str, rel: &str) -> String {
        if self.prefix.is_empty() {
            format!("{id}/{rel}")
        } else {
            format!("{}/{id}/{rel}", self.prefix)
        }
    }

    fn folder_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }
}

async fn s3_client(args: &S3Args) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .load()
        .await;
    let custom_endpoint = std::env::var_os("AWS_ENDPOINT_URL").is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(Duration::from_secs(args.s3_attempt_timeout_secs.max(1)))
        .build();
    let mut conf = aws_sdk_s3::config::Builder::from(&shared)
        .timeout_config(timeouts)
        .force_path_style(args.path_style.unwrap_or(custom_endpoint));
    if shared.region().is_none() {
        // S3-compatible servers rarely care; AWS needs the real one (AWS_REGION).
        conf = conf.region(aws_sdk_s3::config::Region::new("us-east-1"));
    }
    Client::from_conf(conf.build())
}

fn backup_id(now_ms: i64) -> String {
    let ms = u64::try_from(now_ms).unwrap_or(0);
    let stamp = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        .to_string()
        .replace(['-', ':', '.'], "");
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[26..];
    format!("{stamp}-{suffix}")
}

pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let cfg = semantis_dataplane::config::load(args.config.as_deref())?;
    let loc = Location::parse(&args.to)?;
    let client = s3_client(&args.s3).await;
    let data_dir = PathBuf::from(&cfg.storage.data_dir);
    let metadata = open_metadata(&cfg, &data_dir).await?;
    let registry = TenantRegistry::from_config(&cfg).context("failed to load the tenants")?;
    let lance_root = data_dir.join("lance");
    let db = lancedb::connect(&lance_root.to_string_lossy())
        .execute()
        .await
        .with_context(|| format!("failed to open LanceDB in {}", data_dir.display()))?;
    let started = std::time::Instant::now();
    let created_at_ms = now_ms();
    let id = backup_id(created_at_ms);
    let part_size = args.s3.part_size_mib.max(5) * 1024 * 1024;

    // Table versions first, then the metadata: metadata never names a table the backup lacks.
    let mut snapshot = Vec::new();
    for tenant in registry.all() {
        let Some((fingerprint, dimension)) = metadata.active_version(&tenant.name).await? else {
            tracing::info!(tenant = %tenant.name, "no index version yet; nothing to back up");
            continue;
        };
        let table = table_name(&tenant.name, &fingerprint);
        let dimension = usize::try_from(dimension)
            .with_context(|| format!("failed to read the dimension of table {table}"))?;
        let files = Table::open(&db, &table, dimension)
            .await?
            .version_files(&lance_root)
            .await?;
        snapshot.push((tenant.name.clone(), fingerprint, table, files));
    }
    let meta = metadata.export().await?;
    let meta_json = serde_json::to_vec_pretty(&meta).context("failed to encode the metadata")?;

    let mut manifest = Manifest {
        format: FORMAT,
        id: id.clone(),
        created_at_ms,
        dataplane_version: env!("CARGO_PKG_VERSION").to_owned(),
        tables: BTreeMap::new(),
        files: BTreeMap::new(),
    };
    let mut bytes = 0u64;
    for (tenant, fingerprint, table, files) in &snapshot {
        let required = std::iter::once((&files.manifest, true));
        for (rel, must_exist) in files.data.iter().map(|f| (f, false)).chain(required) {
            // The backup mirrors the data directory: `lance/<table dir>/<file>`.
            let rel_key = table_dir(Path::new("lance"), table)
                .join(rel)
                .to_string_lossy()
                .into_owned();
            let path = files.dir.join(rel);
            let sum = match upload_file(&client, &loc, &id, &rel_key, &path, part_size).await {
                Ok(sum) => sum,
                // A data file of an older version, pruned while we copied: not part of the
                // version being backed up. The version's own manifest must be there, though.
                Err(e) if is_not_found(&e) && !must_exist => continue,
                Err(e) => return Err(e),
            };
            bytes += sum.size;
            manifest.files.insert(rel_key, sum);
        }
        manifest
            .tables
            .insert(tenant.clone(), (fingerprint.clone(), table.clone()));
    }
    let sum = FileSum {
        size: meta_json.len() as u64,
        sha256: hex::encode(Sha256::digest(&meta_json)),
    };
    put(&client, &loc, &id, METADATA, meta_json).await?;
    manifest.files.insert(METADATA.to_owned(), sum);
    let manifest_json =
        serde_json::to_vec_pretty(&manifest).context("failed to encode the manifest")?;
    put(&client, &loc, &id, MANIFEST, manifest_json).await?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        backup = %id,
        location = %args.to,
        files = manifest.files.len(),
        bytes,
        secs,
        mb_per_sec = bytes as f64 / 1e6 / secs.max(1e-3),
        "backup complete"
    );
    println!("{id}");
    if args.keep.is_some() || args.keep_within.is_some() {
        apply_retention(&client, &loc, args.keep, args.keep_within).await?;
    }
    Ok(())
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

async fn put(
    client: &Client,
    loc: &Location,
    id: &str,
    rel: &str,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    let key = loc.key(id, rel);
    client
        .put_object()
        .bucket(&loc.bucket)
        .key(&key)
        .body(ByteStream::from(body))
        .send()
        .await
        .with_context(|| format!("failed to upload s3://{}/{key}", loc.bucket))?;
    Ok(())
}

/// Upload one file (multipart above `part_size`), hashing it as it is read.
async fn upload_file(
    client: &Client,
    loc: &Location,
    id: &str,
    rel: &str,
    path: &Path,
    part_size: usize,
) -> anyhow::Result<FileSum> {
    let key = loc.key(id, rel);
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("failed to open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut first = read_chunk(&mut file, part_size, path).await?;
    hasher.update(&first);
    if first.len() < part_size {
        let size = first.len() as u64;
        put(client, loc, id, rel, std::mem::take(&mut first)).await?;
        return Ok(FileSum {
            size,
            sha256: hex::encode(hasher.finalize()),
        });
    }
    let upload = client
        .create_multipart_upload()
        .bucket(&loc.bucket)
        .key(&key)
        .send()
        .await
        .with_context(|| {
            format!(
                "failed to start a multipart upload of s3://{}/{key}",
                loc.bucket
            )
        })?;
    let upload_id = upload
        .upload_id()
        .context("failed to start a multipart upload: the server returned no upload id")?
        .to_owned();
    let result: anyhow::Result<(u64, Vec<CompletedPart>)> = async {
        let mut parts = Vec::new();
        let mut size = 0u64;
        let mut chunk = first;
        let mut number = 1;
        while !chunk.is_empty() {
            size += chunk.len() as u64;
            let part = client
                .upload_part()
                .bucket(&loc.bucket)
                .key(&key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(ByteStream::from(chunk))
                .send()
                .await
                .with_context(|| {
                    format!(
                        "failed to upload part {number} of s3://{}/{key}",
                        loc.bucket
                    )
                })?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .build(),
            );
            number += 1;
            chunk = read_chunk(&mut file, part_size, path).await?;
            hasher.update(&chunk);
        }
        Ok((size, parts))
    }
    .await;
    match result {
        Ok((size, parts)) => {
            client
                .complete_multipart_upload()
                .bucket(&loc.bucket)
                .key(&key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .with_context(|| {
                    format!("failed to complete the upload of s3://{}/{key}", loc.bucket)
                })?;
            Ok(FileSum {
                size,
                sha256: hex::encode(hasher.finalize()),
            })
        }
        Err(e) => {
            let _ = client
                .abort_multipart_upload()
                .bucket(&loc.bucket)
                .key(&key)
                .upload_id(&upload_id)
                .send()
                .await;
            Err(e)
        }
    }
}

async fn read_chunk(
    file: &mut tokio::fs::File,
    size: usize,
    path: &Path,
) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size);
    let mut limited = file.take(size as u64);
    limited
        .read_to_end(&mut buf)
        .await
        .with_context(|| format!("failed to read {}", path.display()))?;
    Ok(buf)
}

/// Backup folders under the prefix: (id, complete).
async fn list_backups(client: &Client, loc: &Location) -> anyhow::Result<Vec<(String, bool)>> {
    let prefix = loc.folder_prefix();
    let mut folders = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(&loc.bucket)
        .prefix(&prefix)
        .delimiter("/")
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.with_context(|| format!("failed to list s3://{}/{prefix}", loc.bucket))?;
        for p in page.common_prefixes() {
            if let Some(id) = p
                .prefix()
                .and_then(|p| p.strip_prefix(&prefix))
                .map(|p| p.trim_end_matches('/'))
            {
                folders.push(id.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    for id in folders {
        let complete = client
            .head_object()
            .bucket(&loc.bucket)
            .key(loc.key(&id, MANIFEST))
            .send()
            .await
            .is_ok();
        out.push((id, complete));
    }
    out.sort();
    Ok(out)
}

async fn fetch_manifest(client: &Client, loc: &Location, id: &str) -> anyhow::Result<Manifest> {
    let bytes = get(client, loc, id, MANIFEST).await?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("failed to read the manifest of backup {id}: it is corrupt"))?;
    ensure!(
        manifest.format == FORMAT,
        "failed to read backup {id}: format {} is not the supported {FORMAT}",
        manifest.format
    );
    Ok(manifest)
}

async fn get(client: &Client, loc: &Location, id: &str, rel: &str) -> anyhow::Result<Vec<u8>> {
    let key = loc.key(id, rel);
    let out = client
        .get_object()
        .bucket(&loc.bucket)
        .key(&key)
        .send()
        .await
        .with_context(|| {
            format!(
                "failed to download s3://{}/{key} (the backup is incomplete)",
                loc.bucket
            )
        })?;
    let bytes = out
        .body
        .collect()
        .await
        .with_context(|| format!("failed to download s3://{}/{key}", loc.bucket))?;
    Ok(bytes.into_bytes().to_vec())
}

async fn apply_retention(
    client: &Client,
    loc: &Location,
    keep: Option<u64>,
    keep_within: Option<Duration>,
) -> anyhow::Result<()> {
    let backups = list_backups(client, loc).await?;
    let complete: Vec<&String> = backups
        .iter()
        .filter(|(_, c)| *c)
        .map(|(id, _)| id)
        .collect();
    let newest_complete = complete.last().map(|s| s.as_str());
    let cutoff_ms =
        keep_within.map(|d| now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut doomed = Vec::new();
    for (rank, id) in complete.iter().rev().enumerate() {
        let by_count = keep.is_some_and(|n| (rank as u64) < n);
        let by_age = match cutoff_ms {
            Some(cutoff) => fetch_manifest(client, loc, id).await?.created_at_ms >= cutoff,
            None => false,
        };
        if !(by_count || by_age) {
            doomed.push((*id).clone());
        }
    }
    // Interrupted backups older than the newest complete one will never complete.
    for (id, complete) in &backups {
        if !complete && newest_complete.is_some_and(|n| id.as_str() < n) {
            doomed.push(id.clone());
        }
    }
    for id in &doomed {
        delete_folder(client, loc, id).await?;
        tracing::info!(backup = %id, "deleted by retention");
    }
    Ok(())
}

async fn delete_folder(client: &Client, loc: &Location, id: &str) -> anyhow::Result<()> {
    let prefix = loc.key(id, "");
    let mut pages = client
        .list_objects_v2()
        .bucket(&loc.bucket)
        .prefix(&prefix)
        .into_paginator()
        .send();
    let mut keys = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.with_context(|| format!("failed to list s3://{}/{prefix}", loc.bucket))?;
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
    }
    // The manifest goes first: a half-deleted backup is then an incomplete one, never a
    // complete one with holes.
    keys.sort_by_key(|k| !k.ends_with(MANIFEST));
    if let Some(pos) = keys.iter().position(|k| k.ends_with(MANIFEST)) {
        let manifest = keys.remove(pos);
        client
            .delete_object()
            .bucket(&loc.bucket)
            .key(&manifest)
            .send()
            .await
            .with_context(|| format!("failed to delete s3://{}/{manifest}", loc.bucket))?;
    }
    for chunk in keys.chunks(1000) {
        let objects = chunk
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .context("failed to build a delete request")?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .context("failed to build a delete request")?;
        client
            .delete_objects()
            .bucket(&loc.bucket)
            .delete(delete)
            .send()
            .await
            .with_context(|| format!("failed to delete s3://{}/{prefix}", loc.bucket))?;
    }
    Ok(())
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let cfg = semantis_dataplane::config::load(args.config.as_deref())?;
    let loc = Location::parse(&args.from)?;
    let client = s3_client(&args.s3).await;
    let data_dir = PathBuf::from(&cfg.storage.data_dir);
    let started = std::time::Instant::now();
    if args.if_empty {
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("failed to create {}", data_dir.display()))?;
        if !open_metadata(&cfg, &data_dir).await?.is_empty().await? {
            tracing::info!("the metadata store already records tenants: nothing to restore");
            return Ok(());
        }
    }
    let id = match &args.backup {
        Some(id) => id.clone(),
        None => list_backups(&client, &loc)
            .await?
            .into_iter()
            .filter(|(_, complete)| *complete)
            .map(|(id, _)| id)
            .next_back()
            .with_context(|| {
                format!("failed to restore: no complete backup under {}", args.from)
            })?,
    };
    let manifest = fetch_manifest(&client, &loc, &id).await?;

    // Refuse before touching anything when the target already holds a cache.
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("failed to create {}", data_dir.display()))?;
    let metadata = open_metadata(&cfg, &data_dir).await?;
    if !metadata.is_empty().await? {
        bail!(
            "failed to restore: the metadata store already records tenants; restore needs empty stores"
        );
    }
    let lance_dir = data_dir.join("lance");
    for (_, table) in manifest.tables.values() {
        let dir = table_dir(&lance_dir, table);
        if dir.exists() {
            bail!(
                "failed to restore: {} already exists; restore needs empty stores",
                dir.display()
            );
        }
    }

    // Download everything into a staging folder and verify it there.
    let staging = data_dir.join(format!(".restore-{id}"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("failed to clear {}", staging.display()))?;
    }
    let verified = download_verified(&client, &loc, &id, &manifest, &staging).await;
    let bytes = match verified {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e.context(format!(
                "failed to restore backup {id}; nothing was changed"
            )));
        }
    };
    let meta_bytes = std::fs::read(staging.join(METADATA))
        .with_context(|| format!("failed to read the staged {METADATA}"))?;
    let snapshot: MetadataSnapshot =
        serde_json::from_slice(&meta_bytes).context("failed to decode the backup's metadata")?;

    // Move the tables in, then load the metadata; undo the moves when that fails.
    std::fs::create_dir_all(&lance_dir)
        .with_context(|| format!("failed to create {}", lance_dir.display()))?;
    let mut moved = Vec::new();
    let mut result: anyhow::Result<()> = Ok(());
    for (_, table) in manifest.tables.values() {
        let to = table_dir(&lance_dir, table);
        if let Err(e) = std::fs::rename(table_dir(&staging.join("lance"), table), &to) {
            result = Err(e).with_context(|| format!("failed to move table {table} into place"));
            break;
        }
        moved.push(to);
    }
    if result.is_ok() {
        result = metadata
            .import(&snapshot)
            .await
            .context("failed to load the backup's metadata");
    }
    if let Err(e) = result {
        for dir in moved {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.context(format!(
            "failed to restore backup {id}; nothing was changed"
        )));
    }
    let _ = std::fs::remove_dir_all(&staging);
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        backup = %id,
        tenants = manifest.tables.len(),
        bytes,
        secs,
        mb_per_sec = bytes as f64 / 1e6 / secs.max(1e-3),
        "restore complete"
    );
    println!("{id}");
    Ok(())
}

/// Download every file the manifest lists into `staging`, checking size and SHA-256.
async fn download_verified(
    client: &Client,
    loc: &Location,
    id: &str,
    manifest: &Manifest,
    staging: &Path,
) -> anyhow::Result<u64> {
    ensure!(
        manifest.files.contains_key(METADATA),
        "the backup's manifest lists no {METADATA}"
    );
    let mut bytes = 0u64;
    for (rel, want) in &manifest.files {
        ensure!(
            !rel.split('/').any(|part| part == ".." || part.is_empty()),
            "the manifest names an unsafe path `{rel}`"
        );
        let key = loc.key(id, rel);
        let mut out = client
            .get_object()
            .bucket(&loc.bucket)
            .key(&key)
            .send()
            .await
            .with_context(|| {
                format!(
                    "failed to download s3://{}/{key}: the backup is partial",
                    loc.bucket
                )
            })?;
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        let mut file = tokio::fs::File::create(&path)
            .await
            .with_context(|| format!("failed to create {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = out
            .body
            .try_next()
            .await
            .with_context(|| format!("failed to download s3://{}/{key}", loc.bucket))?
        {
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .with_context(|| format!("failed to write {}", path.display()))?;
        }
        file.flush()
            .await
            .with_context(|| format!("failed to write {}", path.display()))?;
        let got = hex::encode(hasher.finalize());
        if size != want.size || got != want.sha256 {
            bail!(
                "the backup is corrupt: {rel} has {size} bytes with SHA-256 {got}, the manifest says {} bytes with {}",
                want.size,
                want.sha256
            );
        }
        bytes += size;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_split_bucket_and_prefix() {
        let l = Location::parse("s3://b/some/prefix/").expect("parse");
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("b", "some/prefix"));
        assert_eq!(l.key("ID", "manifest.json"), "some/prefix/ID/manifest.json");
        let bare = Location::parse("s3://b").expect("parse");
        assert_eq!(bare.key("ID", "x"), "ID/x");
        assert!(Location::parse("b/prefix").is_err());
        assert!(Location::parse("s3:///prefix").is_err());
    }

    #[test]
    fn backup_ids_sort_by_time() {
        let a = backup_id(1_795_392_000_000);
        let b = backup_id(1_795_392_001_000);
        assert!(a.starts_with("20261123T000000000Z-"), "{a}");
        assert!(a < b);
    }
}

//! The durable write-ahead log behind the in-memory tail (embedded mode).
//!
//! One directory per table, holding numbered segment files of JSON lines. A dedicated thread
//! group-commits: it writes every record waiting in its queue, calls `fdatasync` once, then
//! acknowledges them all, so many concurrent stores share one disk flush. A flush to LanceDB
//! seals the current segment; once the sealed entries are in the table, its files are deleted.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

use super::BackendError;
use semantis_cache::entry::{Entry, EntryFilter};

/// A record in the log. A put is the [`Entry`] itself, serialised.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WalRecord {
    Put(Box<Entry>),
    Delete {
        ids: Vec<String>,
    },
    DeleteWhere {
        filter: EntryFilter,
    },
    /// Cluster mode: everything up to this log position is in the LanceDB table now.
    Flushed {
        upto: String,
    },
}

enum Command {
    Append(Vec<u8>, oneshot::Sender<Result<u64, std::io::Error>>),
    Seal(oneshot::Sender<Result<u64, std::io::Error>>),
    Discard(u64, oneshot::Sender<Result<(), std::io::Error>>),
}

/// Handle to one table's log; cheap to clone.
#[derive(Clone)]
pub struct Wal {
    dir: PathBuf,
    tx: mpsc::Sender<Command>,
}

/// What replay found on disk.
pub struct Replayed {
    pub records: Vec<WalRecord>,
    /// Lines that could not be parsed (a torn write at the end of a segment after a crash).
    pub torn: usize,
}

impl Wal {
    /// Open the log in `dir`, replay every segment, and start the writer on a new segment.
    pub fn open(dir: &Path) -> Result<(Self, Replayed), BackendError> {
        let io = |action, source| BackendError::Wal {
            action,
            path: dir.display().to_string(),
            source,
        };
        fs::create_dir_all(dir).map_err(|e| io("create", e))?;
        let segments = list_segments(dir).map_err(|e| io("list", e))?;
        let mut records = Vec::new();
        let mut torn = 0;
        for (_, path) in &segments {
            let file = File::open(path).map_err(|e| io("read", e))?;
            for line in BufReader::new(file).split(b'\n') {
                let line = line.map_err(|e| io("read", e))?;
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<WalRecord>(&line) {
                    Ok(r) => records.push(r),
                    Err(_) => torn += 1,
                }
            }
        }
        let next = segments.last().map_or(1, |(n, _)| n + 1);
        let segment = Segment::open(dir, next).map_err(|e| io("create a segment of", e))?;
        let (tx, rx) = mpsc::channel(4096);
        std::thread::Builder::new()
            .name("semantis-wal".into())
            .spawn(move || writer(segment, rx))
            .map_err(|e| io("start the writer of", e))?;
        Ok((
            Self {
                dir: dir.to_owned(),
                tx,
            },
            Replayed { records, torn },
        ))
    }

    fn err(&self, action: &'static str, source: std::io::Error) -> BackendError {
        BackendError::Wal {
            action,
            path: self.dir.display().to_string(),
            source,
        }
    }

    /// Append and wait until the record is on disk. Returns the segment it landed in.
    pub async fn append(&self, record: &WalRecord) -> Result<u64, BackendError> {
        let mut line = serde_json::to_vec(record).map_err(|e| self.err("encode", e.into()))?;
        line.push(b'\n');
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Command::Append(line, ack))
            .await
            .map_err(|_| self.closed())?;
        done.await
            .map_err(|_| self.closed())?
            .map_err(|e| self.err("append to", e))
    }

    /// Close the current segment and start a new one; returns the sealed segment's number.
    /// Everything appended before this call is in a segment ≤ the returned number.
    pub async fn seal(&self) -> Result<u64, BackendError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Command::Seal(ack))
            .await
            .map_err(|_| self.closed())?;
        done.await
            .map_err(|_| self.closed())?
            .map_err(|e| self.err("seal", e))
    }

    /// Delete every segment numbered ≤ `upto` (their content is in the table now).
    pub async fn discard(&self, upto: u64) -> Result<(), BackendError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Command::Discard(upto, ack))
            .await
            .map_err(|_| self.closed())?;
        done.await
            .map_err(|_| self.closed())?
            .map_err(|e| self.err("discard segments of", e))
    }

    fn closed(&self) -> BackendError {
        BackendError::Closed(self.dir.display().to_string())
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.wal"))
}

fn open_segment(dir: &Path, n: u64) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, n))?;
    // Make the new file's directory entry durable too.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        let n = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            out.push((n, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The segment being written and how much of it is durable.
struct Segment {
    dir: PathBuf,
    number: u64,
    file: File,
    /// Bytes fsynced so far: everything past this is unacknowledged.
    durable: u64,
    /// A write or fsync failed: the file may end in a fragment, and after a failed fsync the
    /// kernel may have dropped pages it reported written. Nothing more goes into it.
    poisoned: bool,
}

impl Segment {
    fn open(dir: &Path, number: u64) -> std::io::Result<Self> {
        let file = open_segment(dir, number)?;
        let durable = file.metadata()?.len();
        Ok(Self {
            dir: dir.to_owned(),
            number,
            file,
            durable,
            poisoned: false,
        })
    }

    /// Move to the next segment (a seal, or leaving a poisoned one).
    fn rotate(&mut self) -> std::io::Result<()> {
        *self = Self::open(&self.dir, self.number + 1)?;
        Ok(())
    }

    /// After a failure: cut the fragment off (best effort; replay skips a torn last line
    /// anyway) and continue in a fresh segment, so the next record never shares a line
    /// with it. If even that fails the segment stays poisoned and the next write retries.
    fn recover(&mut self) {
        self.poisoned = true;
        let _ = self
            .file
            .set_len(self.durable)
            .and_then(|()| self.file.sync_data());
        if self.rotate().is_ok() {
            self.poisoned = false;
        }
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.poisoned {
            self.recover();
            if self.poisoned {
                return Err(std::io::Error::other(
                    "the write-ahead log could not start a new segment after a failed write",
                ));
            }
        }
        let written = self.file.write_all(line);
        if written.is_err() {
            self.recover();
        }
        written
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match self.file.sync_data().and_then(|()| self.file.metadata()) {
            Ok(meta) => {
                self.durable = meta.len();
                Ok(())
            }
            Err(e) => {
                self.recover();
                Err(e)
            }
        }
    }
}

/// The group-commit loop: one blocking thread per log.
fn writer(mut seg: Segment, mut rx: mpsc::Receiver<Command>) {
    const MAX_GROUP: usize = 1024;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut pending = Vec::new();
        let mut result: std::io::Result<()> = Ok(());
        for cmd in batch {
            match cmd {
                Command::Append(line, ack) => {
                    if result.is_ok() {
                        result = seg.write(&line);
                    }
                    pending.push(ack);
                }
                Command::Seal(ack) => {
                    let outcome = commit(&mut seg, &mut result, &mut pending).and_then(|()| {
                        let sealed = seg.number;
                        seg.rotate()?;
                        Ok(sealed)
                    });
                    let _ = ack.send(outcome);
                }
                Command::Discard(upto, ack) => {
                    let outcome = commit(&mut seg, &mut result, &mut pending)
                        .and_then(|()| discard(&seg.dir, upto.min(seg.number.saturating_sub(1))));
                    let _ = ack.send(outcome);
                }
            }
        }
        let _ = commit(&mut seg, &mut result, &mut pending);
    }
}

/// fsync what was written and answer the waiting appends. A failed write or fsync fails
/// every append of the group: none of them is acknowledged.
fn commit(
    seg: &mut Segment,
    result: &mut std::io::Result<()>,
    pending: &mut Vec<oneshot::Sender<std::io::Result<u64>>>,
) -> std::io::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let segment = seg.number;
    let outcome = std::mem::replace(result, Ok(())).and_then(|()| seg.sync());
    for ack in pending.drain(..) {
        let _ = ack.send(match &outcome {
            Ok(()) => Ok(segment),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        });
    }
    outcome
}

/// Delete the segments numbered ≤ `upto`, then make the deletions durable: a power cut must
/// not bring back a segment whose deletes were already undone by a later one.
fn discard(dir: &Path, upto: u64) -> std::io::Result<()> {
    let mut removed = false;
    for (n, path) in list_segments(dir)? {
        if n <= upto {
            fs::remove_file(path)?;
            removed = true;
        }
    }
    if removed {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(id: &str) -> WalRecord {
        WalRecord::Put(Box::new(Entry {
            id: id.into(),
            scope: "s".into(),
            namespace: String::new(),
            exact_key: "k".into(),
            prompt: "p".into(),
            vector: std::sync::Arc::from(vec![0.25f32, -1.5]),
            response: std::sync::Arc::from(b"{}".to_vec()),
            model: String::new(),
            created_at_ms: 1,
            expires_at_ms: 2,
            prompt_tokens: 3,
            completion_tokens: 4,
            cost_usd: 0.5,
            metadata: "{}".into(),
        }))
    }

    #[tokio::test]
    async fn replays_what_was_acknowledged_and_skips_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (wal, replayed) = Wal::open(dir.path()).expect("open");
            assert!(replayed.records.is_empty());
            wal.append(&put("a")).await.expect("append a");
            wal.append(&put("b")).await.expect("append b");
        }
        // A crash mid-write leaves half a line behind.
        let seg = list_segments(dir.path()).expect("list")[0].1.clone();
        let mut f = OpenOptions::new().append(true).open(seg).expect("open seg");
        f.write_all(b"{\"op\":\"put\",\"id\":").expect("torn write");
        drop(f);
        let (_wal, replayed) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(replayed.records.len(), 2);
        assert_eq!(replayed.torn, 1);
    }

    #[tokio::test]
    async fn sealed_segments_are_discarded_after_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(dir.path()).expect("open");
        wal.append(&put("a")).await.expect("append");
        let sealed = wal.seal().await.expect("seal");
        wal.append(&put("b")).await.expect("append after seal");
        wal.discard(sealed).await.expect("discard");
        drop(wal);
        let (_wal, replayed) = Wal::open(dir.path()).expect("reopen");
        let ids: Vec<_> = replayed
            .records
            .iter()
            .filter_map(|r| match r {
                WalRecord::Put(e) => Some(e.id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(ids, vec!["b".to_owned()]);
    }
}

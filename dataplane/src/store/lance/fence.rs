//! Fencing the table's writers (cluster mode). The Redis flush lease says who *should* write
//! the table; it cannot stop a leader that stalled (a GC pause, a frozen node, a slow disk)
//! past its lease in the middle of a flush and then commits an older batch after the new
//! leader applied a delete. LanceDB cannot fence it either: no commit operation of Lance 14
//! conflicts with an append without also rolling back the commits it races (`Restore` and
//! `Overwrite` are rebased over them).
//!
//! The fence is a small file beside the table, `<table>.lance.fence`, holding the epoch of the
//! newest leader that wrote (epochs come from the lease: each take increments a Redis counter).
//! A writer holds an exclusive `flock` on it for the whole write and checks the epoch under the
//! lock: an older epoch than the file's is fenced out for good; a newer one records itself
//! first. A leader frozen mid-write keeps the lock, so its successor waits (`busy`) instead of
//! writing around it, and applies its deletes after the stale write landed; once the stale
//! leader is done, its epoch is refused. `flock` holds across processes on one host and across
//! hosts on the shared filesystems a ReadWriteMany volume uses (NFSv4 maps it onto its leased
//! locks; CephFS supports it); a process that dies releases it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

use crate::store::BackendError;

/// The fence file of table `name` under the LanceDB root.
pub fn fence_path(lance_root: &Path, name: &str) -> PathBuf {
    lance_root.join(format!("{name}.lance.fence"))
}

/// The right to write the table, held until dropped (closing the file releases the lock).
#[derive(Debug)]
pub struct FenceGuard {
    _file: Option<File>,
}

impl FenceGuard {
    /// No fence: embedded mode has one writer, the process.
    pub fn unfenced() -> Self {
        Self { _file: None }
    }
}

/// What trying the fence found.
#[derive(Debug)]
pub enum Turn {
    /// This epoch may write while the guard lives.
    Held(FenceGuard),
    /// Another writer is in the middle of a write (possibly frozen): try again later.
    Busy,
    /// A newer leader wrote the table: this epoch must never write again.
    Fenced { current: u64 },
}

#[derive(Clone)]
pub struct Fence {
    path: PathBuf,
}

impl Fence {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Try to take the fence for `epoch` without waiting.
    pub fn enter(&self, epoch: u64) -> Result<Turn, BackendError> {
        let io = |action: &'static str| {
            let path = self.path.display().to_string();
            move |source: std::io::Error| BackendError::Io {
                action,
                path,
                source,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(io("open the write fence"))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(Turn::Busy),
            Err(e) => return Err(io("lock the write fence")(e.into())),
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(io("read the write fence"))?;
        let current = match text.trim() {
            "" => 0,
            t => t.parse::<u64>().map_err(|_| BackendError::Decode {
                table: self.path.display().to_string(),
                reason: format!("the write fence holds `{t}`, not an epoch"),
            })?,
        };
        if current > epoch {
            return Ok(Turn::Fenced { current });
        }
        if current < epoch {
            // Epochs only grow, so the new number is never shorter than the old one: one
            // write over it replaces it whole, and no crash leaves the file empty.
            let new = epoch.to_string();
            file.write_all_at(new.as_bytes(), 0)
                .and_then(|()| file.set_len(new.len() as u64))
                .and_then(|()| file.sync_data())
                .map_err(io("record the epoch in the write fence"))?;
        }
        Ok(Turn::Held(FenceGuard { _file: Some(file) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(turn: Turn) -> Result<FenceGuard, String> {
        match turn {
            Turn::Held(g) => Ok(g),
            other => Err(format!("expected the fence, got {other:?}")),
        }
    }

    #[test]
    fn a_stalled_writer_holds_off_its_successor_then_is_fenced_out()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = fence_path(dir.path(), "t");
        // Two handles, as two replicas (or two processes) have.
        let (old, new) = (Fence::new(path.clone()), Fence::new(path.clone()));

        let stalled = held(old.enter(1)?)?;
        // The new leader cannot write around a write in progress…
        assert!(matches!(new.enter(2)?, Turn::Busy));
        drop(stalled);
        // …and once it wrote, the old leader never writes again.
        drop(held(new.enter(2)?)?);
        assert!(matches!(old.enter(1)?, Turn::Fenced { current: 2 }));
        assert_eq!(std::fs::read_to_string(&path)?, "2");
        // The same leader enters again and again; a later one takes over.
        drop(held(new.enter(2)?)?);
        drop(held(old.enter(10)?)?);
        assert!(matches!(new.enter(2)?, Turn::Fenced { current: 10 }));
        Ok(())
    }

    #[test]
    fn a_damaged_fence_refuses_every_writer() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = fence_path(dir.path(), "t");
        std::fs::write(&path, "x1")?;
        assert!(matches!(
            Fence::new(path).enter(5),
            Err(BackendError::Decode { .. })
        ));
        Ok(())
    }
}

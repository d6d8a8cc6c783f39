//! The sled database and its one owner, [`NodeStore`]: the trees, the file lock, and the
//! group commit that makes several answers durable with one fsync.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::NodeError;

/// What a store that cannot be opened is reported as: its directory, what sled found, and
/// the files it is made of.
fn damaged(path: &Path, detail: &str) -> NodeError {
    let mut files: Vec<String> = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    NodeError::StoreDamaged {
        path: path.to_path_buf(),
        detail: format!("{detail}; its files: {}", files.join(", ")),
    }
}

/// sled writes a snapshot as `snap.<lsn>.generating` and renames it when complete, so such a
/// file is never the store's state, only an unfinished copy of it, left by a crash or a
/// full disk; sled would read it as a damaged snapshot and refuse every open. Removed.
/// Called only after sled, holding the store's lock, failed to read it: a serving node's
/// snapshot in progress is never touched. Returns whether anything was removed.
fn remove_unfinished_snapshots(path: &Path) -> Result<bool, NodeError> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Ok(false); // a store not created yet
    };
    let mut removed = false;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let file = entry.path();
            std::fs::remove_file(&file).map_err(io_at(&file))?;
            tracing::warn!(file = %file.display(), "removed an unfinished sled snapshot");
            removed = true;
        }
    }
    Ok(removed)
}

/// An I/O error on `path`, as a [`NodeError`].
fn io_at(path: &Path) -> impl Fn(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Meta key of the dataset schema's TOML text.
pub(crate) const META_SCHEMA: &[u8] = b"dataset-schema";

/// How long opening waits for a lock held by a store that is still closing.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// The opened database.
#[derive(Debug, Clone)]
pub struct NodeStore {
    db: sled::Db,
    /// sled's log file, for `fdatasync`: sled's own flush on Linux only runs
    /// `sync_file_range`, which neither flushes the drive's cache nor the file's size.
    log: Arc<std::fs::File>,
    path: PathBuf,
    pub(crate) data: sled::Tree,
    pub(crate) ledger: sled::Tree,
    pub(crate) nonces: sled::Tree,
    pub(crate) requests: sled::Tree,
    pub(crate) rounds: sled::Tree,
    /// Logistic fits accepted, for binding their later steps.
    pub(crate) fits: sled::Tree,
    pub(crate) audit: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// Shared by every clone: concurrent flushes are coalesced into one fsync.
    commits: Arc<GroupCommit>,
}

/// Group commit: a caller whose writes are done asks for durability; if an fsync is already
/// running it waits for the next one, which covers its writes and those of everyone else
/// waiting, so N concurrent callers cost about two fsyncs, not N. Writers that announce a
/// flush ahead ([`NodeStore::expect_flush`], e.g. an answer still being computed) are waited
/// for, up to [`GATHER_WAIT`], before an fsync starts: under load, answers computed side by
/// side share one fsync instead of queueing one each.
#[derive(Debug, Default)]
struct GroupCommit {
    state: Mutex<CommitState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct CommitState {
    /// Tickets handed out; a ticket is taken after the caller's writes.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    flushing: bool,
    /// Flushes announced and not yet asked for.
    coming: usize,
    /// fsyncs run (for tests and figures).
    fsyncs: u64,
    /// How long a flush waits for announced ones ([`GATHER_WAIT`] unless a test says).
    gather: Option<Duration>,
}

/// While a leader's fsync runs: if it unwinds, others must not wait for it forever.
struct Leading<'a>(&'a GroupCommit);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let mut state = self
            .0
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.flushing = false;
        self.0.done.notify_all();
    }
}

/// Longest an fsync waits for announced flushes to join it.
pub const GATHER_WAIT: Duration = Duration::from_millis(2);

/// A flush announced ahead ([`NodeStore::expect_flush`]): [`FlushPromise::flush`] keeps it;
/// dropping it withdraws it, so nobody waits for it.
#[must_use = "an announced flush that is never made only delays others"]
#[derive(Debug)]
pub struct FlushPromise {
    store: NodeStore,
    pending: bool,
}

impl FlushPromise {
    /// [`NodeStore::flush`], as announced.
    pub fn flush(mut self) -> Result<(), NodeError> {
        let announced = std::mem::take(&mut self.pending);
        self.store.flush_counted(announced)
    }

    fn withdraw(&mut self) {
        if std::mem::take(&mut self.pending) {
            let commits = &*self.store.commits;
            // A poisoned lock: the next flush reports it.
            if let Ok(mut state) = commits.state.lock() {
                state.coming = state.coming.saturating_sub(1);
            }
            commits.done.notify_all();
        }
    }
}

impl Drop for FlushPromise {
    fn drop(&mut self) {
        self.withdraw();
    }
}

impl NodeStore {
    pub fn open(path: &Path) -> Result<Self, NodeError> {
        // sled finishes background writes on its own threads after a `Db` is dropped, and the
        // file lock goes with the last of them; a reopen right after a close (a node restarted
        // in the same process) waits for that instead of failing.
        let deadline = Instant::now() + LOCK_WAIT;
        let mut cleaned = false;
        let db = loop {
            let config = sled::Config::new()
                .path(path)
                // Durability comes from explicit flushes at the points that matter (ledger
                // charges, recorded answers, ingests); this only bounds what a crash loses
                // elsewhere.
                .flush_every_ms(Some(500));
            // sled panics on some damaged files: that is a damaged store, not a crash.
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
                .map_err(|panic| {
                let detail = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "sled stopped while reading it".into());
                damaged(path, &detail)
            })?;
            match opened {
                Ok(db) => break db,
                // sled read what an interrupted snapshot left (it got the file lock first,
                // so no node is running on this store): remove it and open again, once.
                Err(sled::Error::Corruption { .. })
                    if !cleaned && remove_unfinished_snapshots(path)? =>
                {
                    cleaned = true;
                }
                Err(sled::Error::Corruption { at, .. }) => {
                    return Err(damaged(
                        path,
                        &match at {
                            Some(at) => format!("corrupted data at {at:?}"),
                            None => "a corrupted snapshot or log".into(),
                        },
                    ));
                }
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if Instant::now() >= deadline {
                        return Err(NodeError::StoreLocked {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(other) => return Err(NodeError::Store(other)),
            }
        };
        let store = Self {
            data: db.open_tree("data")?,
            ledger: db.open_tree("ledger")?,
            nonces: db.open_tree("nonces")?,
            requests: db.open_tree("requests")?,
            rounds: db.open_tree("rounds")?,
            fits: db.open_tree("fits")?,
            audit: db.open_tree("audit")?,
            meta: db.open_tree("meta")?,
            path: path.to_path_buf(),
            commits: Arc::default(),
            log: Arc::new(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path.join("db"))
                    .map_err(io_at(&path.join("db")))?,
            ),
            db,
        };
        Ok(store)
    }

    /// The database itself, for the one-time move of an older layout.
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dataset schema this node was created with (kept in the store).
    pub fn schema(&self) -> Result<renkei_engine::schema::DatasetSchema, NodeError> {
        let bytes = self
            .meta
            .get(META_SCHEMA)?
            .ok_or_else(|| NodeError::CorruptStore {
                what: "dataset schema".into(),
                reason: "missing".into(),
            })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| NodeError::CorruptStore {
            what: "dataset schema".into(),
            reason: e.to_string(),
        })?;
        renkei_engine::schema::DatasetSchema::from_toml(text).map_err(|e| NodeError::CorruptStore {
            what: "dataset schema".into(),
            reason: e.to_string(),
        })
    }

    /// Announces a flush this caller will make soon (after writes it is still computing),
    /// so that a flush starting meanwhile waits for it, briefly, and covers both.
    pub fn expect_flush(&self) -> FlushPromise {
        if let Ok(mut state) = self.commits.state.lock() {
            state.coming += 1;
            return FlushPromise {
                store: self.clone(),
                pending: true,
            };
        }
        FlushPromise {
            store: self.clone(),
            pending: false,
        }
    }

    #[cfg(test)]
    fn set_gather_wait(&self, wait: Duration) {
        if let Ok(mut state) = self.commits.state.lock() {
            state.gather = Some(wait);
        }
    }

    /// fsyncs run by [`NodeStore::flush`] since the store was opened.
    pub fn fsyncs(&self) -> u64 {
        self.commits.state.lock().map_or(0, |state| state.fsyncs)
    }

    /// sled's flush (its log buffers written, `sync_file_range`), then `fdatasync` of the
    /// log, so a power loss cannot take what was flushed.
    fn sync(&self) -> Result<(), NodeError> {
        self.db.flush()?;
        self.log.sync_data().map_err(io_at(&self.path.join("db")))
    }

    /// Applies `batch` to `tree` and returns once it is on disk, sled's blob files included:
    /// values larger than about 128 KB live in files of their own (named by their log
    /// sequence number), which sled writes without syncing. Only the files this batch wrote
    /// are synced.
    pub fn apply_durably(&self, tree: &sled::Tree, batch: sled::Batch) -> Result<(), NodeError> {
        let before = self.blob_numbers()?.max();
        tree.apply_batch(batch)?;
        self.flush()?;
        let blobs = self.path.join("blobs");
        let mut wrote = false;
        for number in self.blob_numbers()? {
            if before.is_some_and(|newest| number <= newest) {
                continue;
            }
            let path = blobs.join(number.to_string());
            match std::fs::File::open(&path) {
                Ok(file) => file.sync_all().map_err(io_at(&path))?,
                // Collected by sled meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_at(&path)(e)),
            }
            wrote = true;
        }
        if wrote {
            // The directory entries that name them.
            std::fs::File::open(&blobs)
                .and_then(|dir| dir.sync_all())
                .map_err(io_at(&blobs))?;
        }
        Ok(())
    }

    /// The numbers of sled's blob files.
    fn blob_numbers(&self) -> Result<impl Iterator<Item = u64>, NodeError> {
        let blobs = self.path.join("blobs");
        let names = match std::fs::read_dir(&blobs) {
            Ok(entries) => entries
                .map(|entry| entry.map(|e| e.file_name()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_at(&blobs))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_at(&blobs)(e)),
        };
        Ok(names
            .into_iter()
            .filter_map(|name| name.to_str()?.parse().ok()))
    }

    /// Returns once every write made before the call is on disk (fsynced), sharing the
    /// fsync with concurrent callers and with announced ones that arrive within
    /// [`GATHER_WAIT`].
    pub fn flush(&self) -> Result<(), NodeError> {
        self.flush_counted(false)
    }

    /// [`NodeStore::flush`]; `announced` if the caller's [`FlushPromise`] is kept by it (the
    /// announcement and the ticket change together, so a gathering leader cannot start
    /// between them and leave this caller for the next fsync).
    fn flush_counted(&self, announced: bool) -> Result<(), NodeError> {
        let poisoned = || NodeError::CorruptStore {
            what: "commit coordinator".into(),
            reason: "a flushing thread panicked".into(),
        };
        let commits = &*self.commits;
        let mut state = commits.state.lock().map_err(|_| poisoned())?;
        if announced {
            state.coming = state.coming.saturating_sub(1);
        }
        state.issued += 1;
        let ticket = state.issued;
        // Wake a leader waiting for this caller.
        commits.done.notify_all();
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if state.flushing {
                state = commits.done.wait(state).map_err(|_| poisoned())?;
                continue;
            }
            state.flushing = true;
            let deadline = Instant::now() + state.gather.unwrap_or(GATHER_WAIT);
            while state.coming > 0 {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = commits
                    .done
                    .wait_timeout(state, deadline - now)
                    .map_err(|_| poisoned())?
                    .0;
            }
            // This flush covers every ticket issued so far.
            let target = state.issued;
            state.fsyncs += 1;
            drop(state);
            // Should sled panic, the guard still hands the leader's role on.
            let leading = Leading(commits);
            let flushed = self.sync();
            std::mem::forget(leading);
            state = commits.state.lock().map_err(|_| poisoned())?;
            state.flushing = false;
            if flushed.is_ok() {
                state.durable = state.durable.max(target);
            }
            commits.done.notify_all();
            flushed?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, NodeStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = NodeStore::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    /// A flush waits for an announced one and covers it: two answers, one fsync.
    #[test]
    fn an_announced_flush_shares_the_fsync() {
        let (_dir, store) = store();
        // Long enough that only the announced flush (not the timeout) ends the wait.
        store.set_gather_wait(Duration::from_secs(60));
        let announced = store.expect_flush();
        let leader = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.meta.insert("a", "1").unwrap();
                store.flush().unwrap();
            })
        };
        // The leader is waiting (or about to) for the announced flush.
        while store.commits.state.lock().unwrap().issued == 0 {
            std::thread::yield_now();
        }
        store.meta.insert("b", "2").unwrap();
        announced.flush().unwrap();
        leader.join().unwrap();
        assert_eq!(store.fsyncs(), 1);

        // A withdrawn announcement (dropped: the answer failed) keeps nobody waiting.
        let withdrawn = store.expect_flush();
        let leader = {
            let store = store.clone();
            std::thread::spawn(move || store.flush().unwrap())
        };
        while store.commits.state.lock().unwrap().issued == 2 {
            std::thread::yield_now();
        }
        drop(withdrawn);
        leader.join().unwrap();
        assert_eq!(store.fsyncs(), 2);
    }

    /// Without announcements a flush does not wait; with one that never comes, it waits
    /// no longer than the bound.
    #[test]
    fn a_flush_waits_only_for_announced_ones_and_not_forever() {
        let (_dir, store) = store();
        store.flush().unwrap();
        assert_eq!(store.fsyncs(), 1);
        store.set_gather_wait(Duration::from_millis(20));
        let _late = store.expect_flush();
        let start = Instant::now();
        store.flush().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert_eq!(store.fsyncs(), 2);
    }

    /// Large values are sled blob files, which sled does not sync; `apply_durably` does.
    #[test]
    fn large_values_live_in_blob_files_that_are_synced() {
        let (dir, store) = store();
        let mut batch = sled::Batch::default();
        batch.insert("big", vec![7u8; 1 << 20]);
        store.apply_durably(&store.data, batch).unwrap();
        let blobs = std::fs::read_dir(dir.path().join("store").join("blobs")).unwrap();
        assert!(blobs.count() >= 1);
        assert_eq!(store.data.get("big").unwrap().unwrap().len(), 1 << 20);
    }
}

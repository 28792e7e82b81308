//! The outbox: everything the agent must tell the server, kept in SQLite until the server
//! acknowledges it.
//!
//! ```text
//! {data_dir}/outbox.db      items(id, priority, kind, at_ms, bytes, body)   WAL, auto_vacuum
//! ```
//!
//! Ids increase with every stored item and are never reused (`AUTOINCREMENT`), so the server
//! can store items idempotently by (device, id) and acknowledge "everything up to id N"; only
//! then are items deleted. Sending never deletes.
//!
//! A byte quota bounds the files on disk (the database and its write-ahead log). When an
//! append would pass it, the oldest items of the lowest priority go first (samples, then
//! detailed telemetry, then summaries); install and rollback events are never evicted. What
//! was evicted is counted per kind, persisted, and reported upstream in an `evictions` item.
//!
//! This type is synchronous and owns its connection; the agent runs it on one thread of its
//! own and talks to it through a channel, so writers never wait for the disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleet_protocol::outbox::{Evictions, Item, ItemBody, Priority};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::disk::DiskWatch;

/// Why the outbox could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {cause}")]
    Sqlite {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    #[error("outbox {path}: an item cannot be encoded: {cause}")]
    Encode {
        path: PathBuf,
        cause: serde_json::Error,
    },
}

impl OutboxError {
    /// Whether the disk had no room for the write (SQLite's `SQLITE_FULL`, or an I/O error
    /// that says so).
    pub fn is_disk_full(&self) -> bool {
        match self {
            OutboxError::Sqlite { cause, .. } => {
                cause.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
                    || cause.to_string().contains("No space left")
            }
            OutboxError::Encode { .. } => false,
        }
    }
}

/// The outbox's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Bytes the database and its log may take on disk together.
    pub quota_bytes: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            quota_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What one append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendReport {
    /// Ids given to the appended items that were stored, in order (incoming items given up
    /// to the quota get none).
    pub ids: Vec<u64>,
    /// Items evicted to make room, by kind.
    pub evicted: BTreeMap<String, u64>,
}

/// An item in its stored form: the body as JSON, with what the outbox needs to know about it.
#[derive(Debug, Clone)]
pub struct EncodedItem {
    pub at_ms: i64,
    pub priority: Priority,
    pub kind: &'static str,
    pub body: Vec<u8>,
}

impl EncodedItem {
    pub fn new(at_ms: i64, body: &ItemBody) -> Result<EncodedItem, serde_json::Error> {
        Ok(EncodedItem {
            at_ms,
            priority: body.priority(),
            kind: body.kind(),
            body: serde_json::to_vec(body)?,
        })
    }
}

/// Counts and sizes, for health reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub items: u64,
    /// The highest id ever given to an item (0 before the first), kept by SQLite across
    /// deletions and restarts.
    pub max_id: u64,
    pub content_bytes: u64,
    pub file_bytes: u64,
    /// Evictions not yet reported upstream, by kind.
    pub unreported_evictions: BTreeMap<String, u64>,
}

/// The order in which `make_room` takes victims within one priority.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Stored items the uplink has not sent yet, oldest first.
    NeverSent,
    /// The items being appended.
    Incoming,
    /// Stored items sent and awaiting their ack.
    Sent,
}

/// Share of the quota the stored content may fill before evictions start: SQLite pages are
/// never full, the index takes its share, and the log needs room to work in.
const CONTENT_SHARE_OF_QUOTA: f64 = 0.4;

/// Share of the content budget by which items awaiting their ack may take the content past
/// the budget (see `make_room`).
const SENT_OVER_BUDGET_SHARE: u64 = 8;

/// Share of the quota the write-ahead log may grow to before it is folded into the database.
const WAL_SHARE_OF_QUOTA: u64 = 8;

/// Share of the quota one append transaction may write (see `append_encoded`).
const APPEND_SLICE_SHARE_OF_QUOTA: u64 = 32;

/// Share of the quota one vacuum step may move through the log (see `give_back_space`).
const VACUUM_STEP_SHARE_OF_QUOTA: u64 = 32;

pub struct Outbox {
    connection: Connection,
    path: PathBuf,
    limits: OutboxLimits,
    /// Sum of the stored bodies' sizes, kept in step with every change.
    content_bytes: u64,
    /// The highest id `next_batch` has handed out: items up to it may be at the server already
    /// (sent, the ack not back yet), so evicting them could count as lost what was delivered.
    handed_out_up_to: std::cell::Cell<u64>,
    /// Told when a write fails for want of space.
    disk: Option<std::sync::Arc<DiskWatch>>,
}

impl Outbox {
    /// Tells `disk` when a write fails because the disk is full.
    pub fn with_disk_watch(mut self, disk: std::sync::Arc<DiskWatch>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Opens (or creates) the outbox in `path`.
    pub fn open(path: &Path, limits: OutboxLimits) -> Result<Outbox, OutboxError> {
        let sqlite = |cause| OutboxError::Sqlite {
            path: path.to_path_buf(),
            cause,
        };
        let connection = Connection::open(path).map_err(sqlite)?;
        // auto_vacuum must be chosen before the first table exists; it lets deletes give
        // pages back to the file system (incremental_vacuum), so the quota bounds the file.
        let wal_bytes = (limits.quota_bytes / WAL_SHARE_OF_QUOTA).max(64 * 1024);
        connection
            .execute_batch(&format!(
                "PRAGMA auto_vacuum = INCREMENTAL;
                 PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA wal_autocheckpoint = {};
                 PRAGMA journal_size_limit = {wal_bytes};
                 CREATE TABLE IF NOT EXISTS items (
                     id INTEGER PRIMARY KEY AUTOINCREMENT,
                     priority INTEGER NOT NULL,
                     kind TEXT NOT NULL,
                     at_ms INTEGER NOT NULL,
                     bytes INTEGER NOT NULL,
                     body BLOB NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS items_by_priority ON items (priority, id);
                 CREATE TABLE IF NOT EXISTS evictions (
                     kind TEXT PRIMARY KEY,
                     count INTEGER NOT NULL
                 );",
                wal_bytes / 4096
            ))
            .map_err(sqlite)?;
        let content_bytes: i64 = connection
            .query_row("SELECT COALESCE(SUM(bytes), 0) FROM items", [], |row| {
                row.get(0)
            })
            .map_err(sqlite)?;
        Ok(Outbox {
            connection,
            path: path.to_path_buf(),
            limits,
            content_bytes: content_bytes.max(0) as u64,
            handed_out_up_to: std::cell::Cell::new(0),
            disk: None,
        })
    }

    /// Bytes of item bodies the outbox holds before it starts evicting.
    fn content_budget(&self) -> u64 {
        (self.limits.quota_bytes as f64 * CONTENT_SHARE_OF_QUOTA) as u64
    }

    fn sqlite(&self) -> impl Fn(rusqlite::Error) -> OutboxError + '_ {
        |cause| OutboxError::Sqlite {
            path: self.path.clone(),
            cause,
        }
    }

    /// Stores `items` (time, body) in one transaction and returns their ids. Makes room first
    /// when the quota requires it.
    pub fn append(&mut self, items: &[(i64, ItemBody)]) -> Result<AppendReport, OutboxError> {
        let encoded = items
            .iter()
            .map(|(at_ms, body)| EncodedItem::new(*at_ms, body))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|cause| OutboxError::Encode {
                path: self.path.clone(),
                cause,
            })?;
        self.append_encoded(&encoded)
    }

    /// [`Outbox::append`] for items already encoded (by the writers, off the outbox thread).
    ///
    /// A transaction's pages sit in the log, on top of the database file, until the checkpoint
    /// after it: a large batch is stored in slices of a bounded size, so that the two together
    /// stay within the quota however much arrives at once.
    ///
    /// Samples that newer samples of the same call would push out anyway (an outbox thread
    /// behind its writers gets thousands at once) are counted as evicted without being
    /// written: a backlog then costs the disk at most a budget's worth of writes, not its
    /// whole size.
    pub fn append_encoded(&mut self, items: &[EncodedItem]) -> Result<AppendReport, OutboxError> {
        let slice_bytes = (self.limits.quota_bytes / APPEND_SLICE_SHARE_OF_QUOTA).max(16 * 1024);
        let mut report = AppendReport::default();
        let (items, doomed) = without_doomed_samples(items, self.content_budget());
        for (kind, n) in doomed {
            self.connection
                .execute(
                    "INSERT INTO evictions (kind, count) VALUES (?1, ?2)
                     ON CONFLICT (kind) DO UPDATE SET count = count + ?2",
                    params![kind, n as i64],
                )
                .map_err(self.sqlite())?;
            report.evicted.insert(kind.to_string(), n);
        }
        let items = &items[..];
        let mut start = 0;
        let mut slices = 0;
        while start < items.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < items.len()
                && (end == start || bytes + items[end].body.len() as u64 <= slice_bytes)
            {
                bytes += items[end].body.len() as u64;
                end += 1;
            }
            let slice = self.append_slice(&items[start..end])?;
            report.ids.extend(slice.ids);
            for (kind, n) in slice.evicted {
                *report.evicted.entry(kind).or_insert(0) += n;
            }
            start = end;
            slices += 1;
        }
        // A later slice may have evicted items of an earlier one (samples beyond the budget
        // push out the oldest, their own included): report only what is still stored.
        if slices > 1 && !report.evicted.is_empty() {
            if let (Some(&low), Some(&high)) = (report.ids.first(), report.ids.last()) {
                let mut present = self
                    .connection
                    .prepare_cached("SELECT id FROM items WHERE id BETWEEN ?1 AND ?2")
                    .map_err(self.sqlite())?;
                let kept: std::collections::HashSet<u64> = present
                    .query_map([low as i64, high as i64], |row| row.get::<_, i64>(0))
                    .map_err(self.sqlite())?
                    .map(|id| id.map(|id| id as u64))
                    .collect::<Result<_, _>>()
                    .map_err(self.sqlite())?;
                report.ids.retain(|id| kept.contains(id));
            }
        }
        Ok(report)
    }

    /// Stores one slice in one transaction, making room first (in the same transaction: the
    /// pages the evictions free are the ones the inserts take, and each is logged once).
    fn append_slice(&mut self, items: &[&EncodedItem]) -> Result<AppendReport, OutboxError> {
        let path = self.path.clone();
        let sqlite = |cause| OutboxError::Sqlite {
            path: path.clone(),
            cause,
        };
        let budget = self.content_budget();
        let handed_out = self.handed_out_up_to.get();
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite)?;
        let room = make_room(&transaction, budget, self.content_bytes, handed_out, items)
            .map_err(sqlite)?;
        let mut report = AppendReport {
            evicted: room.evicted,
            ..Default::default()
        };
        let mut stored = 0u64;
        {
            let mut insert = transaction
                .prepare_cached(
                    "INSERT INTO items (priority, kind, at_ms, bytes, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sqlite)?;
            for (item, _) in items.iter().zip(&room.keep).filter(|(_, keep)| **keep) {
                insert
                    .execute(params![
                        item.priority as i64,
                        item.kind,
                        item.at_ms,
                        item.body.len() as i64,
                        item.body
                    ])
                    .map_err(sqlite)?;
                report.ids.push(transaction.last_insert_rowid() as u64);
                stored += item.body.len() as u64;
            }
        }
        transaction.commit().map_err(sqlite)?;
        // The freed pages stay on SQLite's free list, where later inserts take them: giving
        // them back to the file system after every eviction would cost checkpoints (fsyncs,
        // milliseconds each on a slow card) per append while the outbox sits at its quota, and
        // an outbox thread that falls behind its writers holds the uplink back. Space goes back
        // only when the file itself nears the quota.
        self.content_bytes = self.content_bytes.saturating_sub(room.freed) + stored;
        if self.file_bytes() > self.limits.quota_bytes / 10 * 9 {
            self.give_back_space()?;
        }
        Ok(report)
    }

    /// Returns freed pages to the file system and folds the log into the database.
    ///
    /// A vacuum moves pages through the log, and the database file only shrinks at the next
    /// checkpoint: done in one go, the log would briefly hold as many pages as were freed on
    /// top of a file that has not shrunk yet, and the two together could pass the quota. So
    /// the log is emptied first, and the vacuum runs in steps, each folded in before the next.
    fn give_back_space(&self) -> Result<(), OutboxError> {
        self.checkpoint()?;
        let step_pages = (self.limits.quota_bytes / VACUUM_STEP_SHARE_OF_QUOTA / 4096).max(16);
        // Each step frees up to `step_pages`; the bound only guards against a freelist that
        // does not shrink (it always does, but a loop on disk state must end).
        for _ in 0..100_000 {
            let free_pages: i64 = self
                .connection
                .query_row("PRAGMA freelist_count", [], |row| row.get(0))
                .map_err(self.sqlite())?;
            if free_pages <= 0 {
                break;
            }
            self.connection
                .execute_batch(&format!("PRAGMA incremental_vacuum({step_pages});"))
                .map_err(self.sqlite())?;
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Folds the log into the database and truncates it. This connection is the outbox's only
    /// one, so no reader can hold the checkpoint back.
    fn checkpoint(&self) -> Result<(), OutboxError> {
        self.connection
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(self.sqlite())?;
        Ok(())
    }

    /// The oldest items with an id above `after`, at most `max_items` and about `max_bytes` of
    /// bodies (always at least one item, so one large item cannot block the queue).
    pub fn next_batch(
        &self,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<Item>, OutboxError> {
        let mut statement = self
            .connection
            .prepare_cached(
                "SELECT id, at_ms, bytes, body FROM items WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(self.sqlite())?;
        let rows = statement
            .query_map(params![after as i64, max_items as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, Vec<u8>>(3)?,
                ))
            })
            .map_err(self.sqlite())?;
        let mut items: Vec<Item> = Vec::new();
        let mut bytes = 0usize;
        for row in rows {
            let (id, at_ms, size, body) = row.map_err(self.sqlite())?;
            if !items.is_empty() && bytes + size as usize > max_bytes {
                break;
            }
            match serde_json::from_slice::<ItemBody>(&body) {
                Ok(body) => items.push(Item {
                    id: id as u64,
                    at_ms,
                    body,
                }),
                // Written by this code, so only a damaged file gets here: skip the item (it
                // is deleted with the next ack) rather than block everything behind it.
                Err(e) => tracing::warn!(id, error = %e, "skipping an unreadable outbox item"),
            }
            bytes += size as usize;
        }
        if let Some(last) = items.last() {
            self.handed_out_up_to
                .set(self.handed_out_up_to.get().max(last.id));
        }
        Ok(items)
    }

    /// The server stored every item up to `up_to`: deletes them. Returns how many went.
    pub fn acknowledge(&mut self, up_to: u64) -> Result<u64, OutboxError> {
        let up_to = up_to.min(i64::MAX as u64) as i64;
        let freed: i64 = self
            .connection
            .query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM items WHERE id <= ?1",
                [up_to],
                |row| row.get(0),
            )
            .map_err(self.sqlite())?;
        let deleted = self
            .connection
            .execute("DELETE FROM items WHERE id <= ?1", [up_to])
            .map_err(self.sqlite())?;
        self.content_bytes = self.content_bytes.saturating_sub(freed.max(0) as u64);
        Ok(deleted as u64)
    }

    /// Takes the eviction counters not yet reported, as an item body to append, and resets
    /// them (in the same transaction as the append, by the caller's ordering: take, then
    /// append; a crash in between loses at most one report's counts).
    pub fn take_evictions(&mut self) -> Result<Option<ItemBody>, OutboxError> {
        let counts = self.unreported_evictions()?;
        if counts.is_empty() {
            return Ok(None);
        }
        self.connection
            .execute("DELETE FROM evictions", [])
            .map_err(self.sqlite())?;
        Ok(Some(ItemBody::Evictions(Evictions { evicted: counts })))
    }

    fn unreported_evictions(&self) -> Result<BTreeMap<String, u64>, OutboxError> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT kind, count FROM evictions")
            .map_err(self.sqlite())?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
            .map_err(self.sqlite())?;
        let mut counts = BTreeMap::new();
        for row in rows {
            let (kind, count) = row.map_err(self.sqlite())?;
            counts.insert(kind, count.max(0) as u64);
        }
        Ok(counts)
    }

    pub fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let items: i64 = self
            .connection
            .query_row("SELECT COUNT(*) FROM items", [], |row| row.get(0))
            .map_err(self.sqlite())?;
        let max_id: i64 = self
            .connection
            .query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'items'), 0)",
                [],
                |row| row.get(0),
            )
            .map_err(self.sqlite())?;
        Ok(OutboxStats {
            items: items.max(0) as u64,
            max_id: max_id.max(0) as u64,
            content_bytes: self.content_bytes,
            file_bytes: self.file_bytes(),
            unreported_evictions: self.unreported_evictions()?,
        })
    }

    /// The database and its log on disk.
    pub fn file_bytes(&self) -> u64 {
        let len = |suffix: &str| {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            std::fs::metadata(PathBuf::from(name))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        len("") + len("-wal")
    }

    /// `PRAGMA integrity_check`: `Ok(())` or SQLite's complaints.
    pub fn integrity_check(&self) -> Result<Result<(), String>, OutboxError> {
        let verdict: Option<String> = self
            .connection
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .optional()
            .map_err(self.sqlite())?;
        Ok(match verdict.as_deref() {
            Some("ok") => Ok(()),
            other => Err(other.unwrap_or("no answer").to_string()),
        })
    }
}

/// Items gathered into one transaction at most.
const GROUP_COMMIT_MAX: usize = 4096;

/// Room in the queue between the writers and the outbox thread.
const QUEUE_CAPACITY: usize = 65_536;

enum Command {
    Append(EncodedItem),
    NextBatch {
        after: u64,
        max_items: usize,
        max_bytes: usize,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Item>, String>>,
    },
    Acknowledge {
        up_to: u64,
        reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
    },
    TakeEvictions {
        reply: tokio::sync::oneshot::Sender<Result<Option<u64>, String>>,
    },
    Stats {
        reply: tokio::sync::oneshot::Sender<Result<OutboxStats, String>>,
    },
}

/// Hands items to the outbox thread. Cheap to clone; never waits for the disk.
#[derive(Clone)]
pub struct OutboxHandle {
    commands: tokio::sync::mpsc::Sender<Command>,
    /// Items refused because the queue was full (the thread could not keep up).
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Why a request to the outbox thread got no answer.
#[derive(Debug, thiserror::Error)]
pub enum OutboxUnavailable {
    /// The thread is gone (the agent is stopping): asking again is pointless.
    #[error("the outbox is not running: {0}")]
    Gone(String),
    /// The thread tried and failed (a full disk, say): asking again later may work.
    #[error("{0}")]
    Failed(String),
}

impl OutboxHandle {
    /// Encodes an item (on the caller's thread, so encoding spreads over the writers) and
    /// queues it. Returns false (and counts it) when the queue is full.
    pub fn push(&self, at_ms: i64, body: &ItemBody) -> bool {
        let item = match EncodedItem::new(at_ms, body) {
            Ok(item) => item,
            Err(e) => {
                tracing::error!(error = %e, kind = body.kind(), "an outbox item cannot be encoded");
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return false;
            }
        };
        match self.commands.try_send(Command::Append(item)) {
            Ok(()) => true,
            Err(_) => {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
        }
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> Command,
    ) -> Result<T, OutboxUnavailable> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| OutboxUnavailable::Gone("its queue is closed".into()))?;
        answer
            .await
            .map_err(|_| OutboxUnavailable::Gone("it stopped before answering".into()))?
            .map_err(OutboxUnavailable::Failed)
    }

    /// The oldest stored items after `after` (everything queued before this call included).
    pub async fn next_batch(
        &self,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<Item>, OutboxUnavailable> {
        self.ask(|reply| Command::NextBatch {
            after,
            max_items,
            max_bytes,
            reply,
        })
        .await
    }

    pub async fn acknowledge(&self, up_to: u64) -> Result<u64, OutboxUnavailable> {
        self.ask(|reply| Command::Acknowledge { up_to, reply })
            .await
    }

    /// Stores the unreported eviction counters as an item; returns its id, if there was any.
    pub async fn report_evictions(&self) -> Result<Option<u64>, OutboxUnavailable> {
        self.ask(|reply| Command::TakeEvictions { reply }).await
    }

    /// Figures of the store, after everything queued before this call is committed.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxUnavailable> {
        self.ask(|reply| Command::Stats { reply }).await
    }
}

/// Starts the outbox thread: it owns the connection, commits queued items in groups, and
/// answers the uplink. It stops when every handle is dropped.
pub fn spawn(outbox: Outbox) -> (OutboxHandle, std::thread::JoinHandle<()>) {
    let (commands, queue) = tokio::sync::mpsc::channel(QUEUE_CAPACITY);
    let thread = std::thread::Builder::new()
        .name("outbox".into())
        .spawn(move || serve(outbox, queue))
        .expect("the outbox thread starts");
    let handle = OutboxHandle {
        commands,
        dropped: Default::default(),
    };
    (handle, thread)
}

/// How often an outbox that could not be opened for want of space is tried again.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Items an outbox not yet open holds in memory; more are dropped and counted.
const HELD_WHILE_CLOSED: usize = 4096;

/// Like [`spawn`], for an outbox that cannot be opened now because the disk is full (SQLite
/// needs room to open a log a crash left behind). The thread opens it as soon as it can;
/// until then requests fail (the uplink tries again) and appends wait in memory (up to
/// [`HELD_WHILE_CLOSED`]; beyond, they are dropped and counted), while the agent serves on.
pub fn spawn_when_open(
    path: PathBuf,
    limits: OutboxLimits,
    disk: std::sync::Arc<DiskWatch>,
) -> (OutboxHandle, std::thread::JoinHandle<()>) {
    let (commands, mut queue) = tokio::sync::mpsc::channel(QUEUE_CAPACITY);
    let dropped: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
    let dropped_while_closed = dropped.clone();
    let thread = std::thread::Builder::new()
        .name("outbox".into())
        .spawn(move || {
            let mut last_try = std::time::Instant::now();
            let mut held: Vec<EncodedItem> = Vec::new();
            let mut outbox = loop {
                match queue.try_recv() {
                    Ok(Command::Append(item)) => {
                        if held.len() < HELD_WHILE_CLOSED {
                            held.push(item);
                        } else {
                            dropped_while_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        continue;
                    }
                    Ok(other) => {
                        other.refuse("the outbox is not open yet: the disk is full");
                        continue;
                    }
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return,
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
                }
                if last_try.elapsed() >= REOPEN_EVERY {
                    last_try = std::time::Instant::now();
                    match Outbox::open(&path, limits) {
                        Ok(outbox) => {
                            tracing::info!(path = %path.display(), "the outbox is open");
                            break outbox.with_disk_watch(disk);
                        }
                        Err(e) => {
                            note_disk_full(Some(&disk), &e);
                            tracing::debug!(error = %e, "the outbox cannot be opened yet");
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            outbox.commit_group(&mut held);
            serve(outbox, queue)
        })
        .expect("the outbox thread starts");
    let handle = OutboxHandle { commands, dropped };
    (handle, thread)
}

/// How long the outbox thread gathers appends before it commits them. Each commit writes a
/// few pages of its own (the index, the free list, the counters) to the log, and every few
/// commits the log is checkpointed, with an fsync that costs milliseconds on an SD card or a
/// busy virtual disk: an item per commit at a thousand inferences a second leaves the thread
/// behind its writers, and the uplink's requests, answered in order, wait behind that. Items
/// wait this long in memory at most; a request from the uplink ends the wait at once.
const GATHER_APPENDS_FOR: std::time::Duration = std::time::Duration::from_millis(100);

/// The outbox thread's loop: until every handle is gone.
fn serve(mut outbox: Outbox, mut queue: tokio::sync::mpsc::Receiver<Command>) {
    // Only to wait for the queue with a timeout; the thread stays a plain thread.
    let timer = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(timer) => Some(timer),
        Err(e) => {
            tracing::warn!(error = %e, "the outbox commits without gathering appends");
            None
        }
    };
    let mut group: Vec<EncodedItem> = Vec::with_capacity(GROUP_COMMIT_MAX);
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        let mut gather_until = None;
        // Appends go into one transaction; any other command is answered after the appends
        // queued before it are committed.
        loop {
            match next.take() {
                Some(Command::Append(item)) => {
                    group.push(item);
                    gather_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + GATHER_APPENDS_FOR);
                    if group.len() >= GROUP_COMMIT_MAX {
                        outbox.commit_group(&mut group);
                        gather_until = None;
                    }
                }
                Some(other) => {
                    outbox.commit_group(&mut group);
                    outbox.answer(other);
                    gather_until = None;
                }
                None => {}
            }
            match queue.try_recv() {
                Ok(command) => next = Some(command),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    let (Some(until), Some(timer)) = (gather_until, &timer) else {
                        break;
                    };
                    let waited = timer
                        .block_on(async { tokio::time::timeout_at(until, queue.recv()).await });
                    match waited {
                        Ok(Some(command)) => next = Some(command),
                        // Every handle is gone, or the time is up.
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        outbox.commit_group(&mut group);
    }
}

impl Command {
    /// Answers a request with `reason` instead of doing it.
    fn refuse(self, reason: &str) {
        let reason = reason.to_string();
        match self {
            Command::Append(_) => {}
            Command::NextBatch { reply, .. } => drop(reply.send(Err(reason))),
            Command::Acknowledge { reply, .. } => drop(reply.send(Err(reason))),
            Command::TakeEvictions { reply } => drop(reply.send(Err(reason))),
            Command::Stats { reply } => drop(reply.send(Err(reason))),
        }
    }
}

/// Reports a full disk to the watch, if that is what `error` is.
fn note_disk_full(disk: Option<&DiskWatch>, error: &OutboxError) {
    if let (Some(disk), true) = (disk, error.is_disk_full()) {
        disk.write_failed("outbox", error);
    }
}

impl Outbox {
    fn commit_group(&mut self, group: &mut Vec<EncodedItem>) {
        if group.is_empty() {
            return;
        }
        if let Err(e) = self.append_encoded(group) {
            // Losing telemetry beats stopping the agent; the error says why (disk full, …).
            tracing::error!(error = %e, items = group.len(), "outbox items could not be stored");
            note_disk_full(self.disk.as_deref(), &e);
        }
        group.clear();
    }

    fn answer(&mut self, command: Command) {
        let disk = self.disk.clone();
        let text = move |e: OutboxError| {
            note_disk_full(disk.as_deref(), &e);
            e.to_string()
        };
        match command {
            Command::Append(..) => unreachable!("appends are grouped"),
            Command::NextBatch {
                after,
                max_items,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(self.next_batch(after, max_items, max_bytes).map_err(text));
            }
            Command::Acknowledge { up_to, reply } => {
                let _ = reply.send(self.acknowledge(up_to).map_err(text));
            }
            Command::TakeEvictions { reply } => {
                let result = self.take_evictions().and_then(|body| match body {
                    None => Ok(None),
                    Some(body) => {
                        let at_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as i64)
                            .unwrap_or(0);
                        Ok(self.append(&[(at_ms, body)])?.ids.first().copied())
                    }
                });
                let _ = reply.send(result.map_err(text));
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats().map_err(text));
            }
        }
    }
}

/// `items` without the samples that newer samples among them would push out of a content
/// `budget` (samples go first, oldest first), and how many those are, by kind.
fn without_doomed_samples(
    items: &[EncodedItem],
    budget: u64,
) -> (Vec<&EncodedItem>, BTreeMap<&'static str, u64>) {
    let mut newer_sample_bytes = 0u64;
    let mut doomed = BTreeMap::new();
    let mut kept: Vec<&EncodedItem> = items
        .iter()
        .rev()
        .filter(|item| {
            if item.priority != Priority::Sample {
                return true;
            }
            if newer_sample_bytes >= budget {
                *doomed.entry(item.kind).or_insert(0) += 1;
                return false;
            }
            newer_sample_bytes += item.body.len() as u64;
            true
        })
        .collect();
    kept.reverse();
    (kept, doomed)
}

/// What [`make_room`] did.
struct Room {
    /// Items given up, by kind (stored ones and incoming ones).
    evicted: BTreeMap<String, u64>,
    /// Which incoming items to store.
    keep: Vec<bool>,
    /// Bytes of stored content deleted.
    freed: u64,
}

/// Makes room in the content `budget` for `incoming`, within `transaction`: gives up the
/// lowest priority first, and within a priority the oldest first, counting the incoming items
/// as the newest. So a burst of samples larger than the budget pushes out older samples and
/// then its own oldest, never a telemetry item. Events are never given up, so a flood of them
/// can pass the budget. Items up to `handed_out` were sent and await their ack: within a
/// priority they go last, since the server may hold them already and their eviction would be
/// counted as a loss that did not happen.
fn make_room(
    transaction: &rusqlite::Transaction<'_>,
    budget: u64,
    content_bytes: u64,
    handed_out: u64,
    incoming: &[&EncodedItem],
) -> Result<Room, rusqlite::Error> {
    let incoming_bytes: u64 = incoming.iter().map(|item| item.body.len() as u64).sum();
    let mut room = Room {
        evicted: BTreeMap::new(),
        keep: vec![true; incoming.len()],
        freed: 0,
    };
    if content_bytes + incoming_bytes <= budget {
        return Ok(room);
    }
    let handed_out = handed_out.min(i64::MAX as u64) as i64;
    // What awaits its ack is deleted when the ack comes, seconds from now: the content may
    // pass its budget by that much, up to a bound, rather than give it up. Otherwise a
    // telemetry item arriving while the whole outbox is in flight would push out a sample the
    // server is about to store, and that sample would be counted twice: received and evicted.
    let awaiting_ack: i64 = transaction
        .prepare_cached("SELECT COALESCE(SUM(bytes), 0) FROM items WHERE id <= ?1")?
        .query_row([handed_out], |row| row.get(0))?;
    let tolerated = (awaiting_ack.max(0) as u64).min(budget / SENT_OVER_BUDGET_SHARE);
    let Some(mut to_free) = (content_bytes + incoming_bytes)
        .checked_sub(budget + tolerated)
        .filter(|bytes| *bytes > 0)
    else {
        return Ok(room);
    };
    let mut oldest = transaction.prepare_cached(
        "SELECT id, kind, bytes FROM items WHERE priority = ?1 AND id > ?2 ORDER BY id LIMIT 512",
    )?;
    let mut oldest_sent = transaction.prepare_cached(
        "SELECT id, kind, bytes FROM items WHERE priority = ?1 AND id <= ?2 ORDER BY id LIMIT 512",
    )?;
    let mut delete = transaction.prepare_cached("DELETE FROM items WHERE id = ?1")?;
    let mut count = transaction.prepare_cached(
        "INSERT INTO evictions (kind, count) VALUES (?1, 1)
         ON CONFLICT (kind) DO UPDATE SET count = count + 1",
    )?;
    for priority in [Priority::Sample, Priority::Telemetry, Priority::Summary] {
        for phase in [Phase::NeverSent, Phase::Incoming, Phase::Sent] {
            if phase == Phase::Incoming {
                for (item, keep) in incoming.iter().zip(room.keep.iter_mut()) {
                    if to_free == 0 {
                        break;
                    }
                    if item.priority == priority {
                        *keep = false;
                        count.execute([item.kind])?;
                        *room.evicted.entry(item.kind.to_string()).or_insert(0) += 1;
                        to_free = to_free.saturating_sub(item.body.len() as u64);
                    }
                }
                continue;
            }
            let query = if phase == Phase::NeverSent {
                &mut oldest
            } else {
                &mut oldest_sent
            };
            while to_free > 0 {
                let victims: Vec<(i64, String, i64)> = query
                    .query_map(params![priority as i64, handed_out], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })?
                    .collect::<Result<_, _>>()?;
                if victims.is_empty() {
                    break;
                }
                for (id, kind, bytes) in victims {
                    delete.execute([id])?;
                    count.execute([&kind])?;
                    *room.evicted.entry(kind).or_insert(0) += 1;
                    let bytes = bytes.max(0) as u64;
                    room.freed += bytes;
                    to_free = to_free.saturating_sub(bytes);
                    if to_free == 0 {
                        break;
                    }
                }
            }
        }
        if to_free == 0 {
            break;
        }
    }
    Ok(room)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_protocol::outbox::{Event, EventKind, Sample};
    use fleet_protocol::ModelName;

    fn event(n: u64) -> ItemBody {
        ItemBody::Event(Event {
            event: EventKind::Activated,
            model: Some(ModelName::new("digits-mlp").unwrap()),
            release: Some(n),
            detail: format!("event {n}"),
        })
    }

    /// A sample whose stored body is a little over `bytes` (base64 of `bytes * 3 / 4`).
    /// An outbox in `dir` with a `quota`-byte limit.
    fn with_quota(dir: &Path, quota: u64) -> Outbox {
        Outbox::open(&dir.join("outbox.db"), OutboxLimits { quota_bytes: quota }).unwrap()
    }

    fn sample(bytes: usize) -> ItemBody {
        ItemBody::Sample(Sample {
            model: ModelName::new("digits-mlp").unwrap(),
            release: 1,
            format: "test".into(),
            data: vec![0x5A; bytes * 3 / 4],
        })
    }

    #[test]
    fn items_survive_reopen_and_go_only_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let ids = {
            let mut outbox = Outbox::open(&path, OutboxLimits::default()).unwrap();
            let items: Vec<_> = (0..10).map(|n| (n as i64, event(n))).collect();
            outbox.append(&items).unwrap().ids
        };
        assert_eq!(ids, (1..=10).collect::<Vec<u64>>());
        let mut outbox = Outbox::open(&path, OutboxLimits::default()).unwrap();
        let batch = outbox.next_batch(0, 4, usize::MAX).unwrap();
        assert_eq!(batch.iter().map(|i| i.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(batch[2].body, event(2));
        // Sending is not deleting; the ack is.
        assert_eq!(outbox.next_batch(0, 4, usize::MAX).unwrap().len(), 4);
        assert_eq!(outbox.acknowledge(4).unwrap(), 4);
        let rest = outbox.next_batch(0, 100, usize::MAX).unwrap();
        assert_eq!(rest.first().map(|i| i.id), Some(5));
        assert_eq!(rest.len(), 6);
        // Ids are never reused, even once everything is acknowledged.
        outbox.acknowledge(10).unwrap();
        assert_eq!(outbox.append(&[(0, event(11))]).unwrap().ids, [11]);
        assert_eq!(outbox.integrity_check().unwrap(), Ok(()));
    }

    #[test]
    fn batches_respect_the_byte_bound_but_always_carry_one_item() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(&dir.path().join("o.db"), OutboxLimits::default()).unwrap();
        outbox
            .append(&[(0, sample(10_000)), (0, sample(10_000)), (0, sample(10))])
            .unwrap();
        assert_eq!(outbox.next_batch(0, 100, 100).unwrap().len(), 1);
        assert_eq!(outbox.next_batch(0, 100, 15_000).unwrap().len(), 1);
        assert_eq!(outbox.next_batch(0, 100, 25_000).unwrap().len(), 3);
        assert_eq!(outbox.next_batch(0, 2, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn a_burst_of_samples_larger_than_the_budget_gives_up_only_samples() {
        let dir = tempfile::tempdir().unwrap();
        let quota = 1024 * 1024;
        let mut outbox = with_quota(dir.path(), quota);
        // One group commit: an event, then more samples than the whole budget holds, with
        // an older-priority item (an evictions report) in the middle.
        let mut items = vec![(0, event(1))];
        items.extend((0..300).map(|_| (0, sample(2_000))));
        items.push((0, ItemBody::Evictions(Default::default())));
        items.extend((0..300).map(|_| (0, sample(2_000))));
        let report = outbox.append(&items).unwrap();
        let samples_evicted = report.evicted["sample"];
        assert!(samples_evicted > 300, "{:?}", report.evicted);
        assert_eq!(
            report.evicted.len(),
            1,
            "only samples went: {:?}",
            report.evicted
        );
        let stored = outbox.next_batch(0, 4096, usize::MAX).unwrap();
        assert_eq!(stored.len() as u64 + samples_evicted, 602);
        assert!(matches!(stored[0].body, ItemBody::Event(_)));
        assert!(stored
            .iter()
            .any(|i| matches!(i.body, ItemBody::Evictions(_))));
        // The newest samples are the ones kept.
        assert_eq!(report.ids.len(), stored.len());
        let stats = outbox.stats().unwrap();
        assert!(stats.content_bytes <= (quota as f64 * CONTENT_SHARE_OF_QUOTA) as u64);
        // Those never written (newer ones of the same burst would have pushed them out) are
        // counted like those written and then given up.
        assert_eq!(
            stats.unreported_evictions.get("sample"),
            Some(&samples_evicted)
        );
    }

    #[test]
    fn items_sent_and_awaiting_their_ack_are_evicted_last() {
        let dir = tempfile::tempdir().unwrap();
        let quota = 1024 * 1024;
        let mut outbox = with_quota(dir.path(), quota);
        let first: Vec<_> = (0..50).map(|_| (0, sample(2_000))).collect();
        outbox.append(&first).unwrap();
        // The uplink sends the first 20: the server may hold them before the ack comes back.
        let sent = outbox.next_batch(0, 20, usize::MAX).unwrap();
        let sent_ids: Vec<u64> = sent.iter().map(|i| i.id).collect();
        // A long offline flood fills the quota many times over.
        for _ in 0..100 {
            let flood: Vec<_> = (0..20).map(|_| (0, sample(2_000))).collect();
            outbox.append(&flood).unwrap();
        }
        let stored = outbox.next_batch(0, 100_000, usize::MAX).unwrap();
        let evicted = outbox.stats().unwrap().unreported_evictions["sample"];
        assert!(evicted > 1_000, "{evicted}");
        // Never-sent items, old and new, went first; the sent ones are all still there.
        assert_eq!(
            &stored[..20].iter().map(|i| i.id).collect::<Vec<_>>(),
            &sent_ids
        );
        assert_eq!(stored.len() as u64 + evicted, 50 + 100 * 20);
    }

    #[test]
    fn the_quota_evicts_samples_first_keeps_events_and_counts_what_went() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let quota = 1024 * 1024;
        let mut outbox = Outbox::open(&path, OutboxLimits { quota_bytes: quota }).unwrap();
        let mut events = 0;
        for round in 0..200u64 {
            // A long offline period at a high sample rate, with an install event now and then.
            let mut items: Vec<_> = (0..20).map(|_| (0, sample(2_000))).collect();
            if round % 10 == 0 {
                items.push((0, event(round)));
                events += 1;
            }
            outbox.append(&items).unwrap();
            assert!(
                outbox.file_bytes() <= quota,
                "round {round}: {} bytes on disk > quota {quota}",
                outbox.file_bytes()
            );
        }
        let stats = outbox.stats().unwrap();
        let evicted = stats
            .unreported_evictions
            .get("sample")
            .copied()
            .unwrap_or(0);
        assert!(evicted > 1_000, "{stats:?}");
        let all = outbox.next_batch(0, 100_000, usize::MAX).unwrap();
        let kept_events = all
            .iter()
            .filter(|i| matches!(i.body, ItemBody::Event(_)))
            .count();
        assert_eq!(kept_events, events, "install events are never evicted");
        assert_eq!(all.len() as u64 + evicted, 200 * 20 + events as u64);

        // The counters travel as one item and are then reset.
        let report = outbox.take_evictions().unwrap().unwrap();
        let ItemBody::Evictions(counts) = &report else {
            panic!("{report:?}")
        };
        assert_eq!(counts.evicted.get("sample"), Some(&evicted));
        assert!(outbox.take_evictions().unwrap().is_none());
        assert_eq!(outbox.integrity_check().unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn the_thread_commits_in_groups_and_answers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("o.db"), OutboxLimits::default()).unwrap();
        let (handle, thread) = spawn(outbox);
        for n in 0..10_000 {
            assert!(handle.push(n, &event(n as u64)));
        }
        // Queued before the question, so committed before the answer.
        let stats = handle.stats().await.unwrap();
        assert_eq!(stats.items, 10_000);
        let batch = handle.next_batch(0, 100, usize::MAX).await.unwrap();
        assert_eq!(batch.len(), 100);
        assert_eq!(batch[0].body, event(0));
        assert_eq!(handle.acknowledge(100).await.unwrap(), 100);
        assert_eq!(handle.report_evictions().await.unwrap(), None);
        assert_eq!(handle.stats().await.unwrap().items, 9_900);
        drop(handle);
        thread.join().unwrap();
    }
}

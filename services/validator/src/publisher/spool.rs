//! The validator's disk spool: usage messages that could not be published yet, kept in order, across restarts.
//!
//! A spool is a directory holding a `LOCK` file and numbered segment files (`00000000000000000001.seg`, …),
//! appended to in order and read from the oldest. A segment starts with an 8-byte magic; each record is
//! `len: u32 LE | crc32(body): u32 LE | body`, with body `events: u32 LE | id_len: u8 | message id | payload`.
//! The payload is the already-encoded NATS message, so the spool knows nothing of the codec, and the message id is
//! the `Nats-Msg-Id` it was first published with, so a replay of a message JetStream did get is dropped there.
//!
//! Writes go only to a segment this process created; segments left by an earlier run are read-only. A record that
//! a crash cut short (a torn tail) or whose checksum fails is skipped and counted, never replayed. A consumed
//! segment is deleted; the read position inside the oldest segment is kept in memory only, so after a crash the
//! part of it already replayed is replayed again (harmless: JetStream's duplicate window, then the worker's
//! `ON CONFLICT DO NOTHING`). A segment that cannot be read, or deleted once replayed, is set aside for the rest of
//! the run rather than hold up every message after it: left on disk, it is read again at the next start.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;

use tollgate_shared::config::FsyncPolicy;
use tollgate_shared::metrics::{SPOOL_BYTES, SPOOL_CORRUPT_RECORDS, SPOOL_SEGMENTS};

const MAGIC: &[u8; 8] = b"TGSPOOL1";
const HEADER_LEN: u64 = MAGIC.len() as u64;
const RECORD_HEADER_LEN: u64 = 8;
/// Larger than any message the publisher writes (the NATS payload limit is 1 MB by default); a length beyond this
/// is garbage, not a record.
const MAX_RECORD_LEN: u32 = 64 * 1024 * 1024;
const SEGMENT_SUFFIX: &str = ".seg";
const LOCK_FILE: &str = "LOCK";

/// One NATS message waiting in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledMessage {
    /// The `Nats-Msg-Id` the message is (re)published with.
    pub id: String,
    /// Events in the payload, for the metrics.
    pub events: u32,
    /// The encoded message, as published.
    pub payload: Bytes,
}

/// Limits and durability of a spool.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
}

impl SpoolOptions {
    /// Segments of about a sixteenth of the bound (between 64 KiB and 64 MiB), so consumed space is freed in steps
    /// that are small next to the bound.
    pub fn new(max_bytes: u64, fsync: FsyncPolicy) -> SpoolOptions {
        SpoolOptions { max_bytes, segment_bytes: (max_bytes / 16).clamp(64 << 10, 64 << 20), fsync }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "the spool directory {dir} is in use by another Tollgate process ({holder}); each validator needs its own \
         directory: stop the other one or set TOLLGATE_SPOOL_DIR (--spool-dir) to another path"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error("the spool is full ({used} of {max} bytes used)")]
    Full { used: u64, max: u64 },
    #[error("spool: cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_owned();
    move |source| SpoolError::Io { what, path, source }
}

/// Where the next unread record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    seq: u64,
    offset: u64,
}

struct Segment {
    seq: u64,
    path: PathBuf,
    /// Bytes of whole records (for our own segment) or the file's length (for one left by an earlier run).
    len: u64,
}

struct Writer {
    file: File,
    dirty: bool,
    last_sync: Instant,
}

/// An open, locked spool directory.
pub struct Spool {
    dir: PathBuf,
    options: SpoolOptions,
    /// Oldest first. When `writer` is set, it appends to the last one.
    segments: VecDeque<Segment>,
    writer: Option<Writer>,
    head_offset: u64,
    next_seq: u64,
    bytes: u64,
    corrupt: u64,
    /// Corruption before this point has been counted already (a record may be read more than once).
    counted_until: Cursor,
    /// Held for the life of the spool: the advisory lock goes away with the process, so a crash leaves no stale
    /// lock behind.
    _lock: File,
}

impl Spool {
    /// Opens (creating if needed) and locks `dir`, picking up what an earlier run left in it.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io_error("create", dir))?;
        let lock = lock(dir)?;
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
            let entry = entry.map_err(io_error("list", dir))?;
            let name = entry.file_name();
            let Some(seq) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)).and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let path = entry.path();
            let len = entry.metadata().map_err(io_error("read", &path))?.len();
            segments.push(Segment { seq, path, len });
        }
        segments.sort_by_key(|s| s.seq);
        let next_seq = segments.last().map_or(1, |s| s.seq + 1);
        let bytes = segments.iter().map(|s| s.len).sum();
        let spool = Spool {
            dir: dir.to_owned(),
            options,
            segments: segments.into(),
            writer: None,
            head_offset: HEADER_LEN,
            next_seq,
            bytes,
            corrupt: 0,
            counted_until: Cursor { seq: 0, offset: 0 },
            _lock: lock,
        };
        spool.report();
        Ok(spool)
    }

    /// True when every record has been consumed.
    pub fn is_empty(&self) -> bool {
        match (self.segments.front(), self.segments.len()) {
            (None, _) => true,
            (Some(front), 1) => self.head_offset >= front.len,
            _ => false,
        }
    }

    /// Bytes on disk (segments, including the consumed part of the oldest).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Segment files on disk.
    #[cfg(test)]
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Records skipped because they were torn or failed their checksum.
    #[cfg(test)]
    pub fn corrupt_records(&self) -> u64 {
        self.corrupt
    }

    /// Whether `message` would fit under the bound now.
    #[cfg(test)]
    pub fn has_room_for(&self, message: &SpooledMessage) -> bool {
        self.bytes + HEADER_LEN + record_len(message) <= self.options.max_bytes
    }

    /// Appends a message at the end, fsyncing as the policy says.
    pub fn append(&mut self, message: &SpooledMessage) -> Result<(), SpoolError> {
        let record = encode_record(message);
        let len = record.len() as u64;
        let rotate = match (&self.writer, self.segments.back()) {
            (Some(_), Some(last)) => last.len > HEADER_LEN && last.len + len > self.options.segment_bytes,
            _ => true,
        };
        let needed = len + if rotate { HEADER_LEN } else { 0 };
        if self.bytes + needed > self.options.max_bytes {
            return Err(SpoolError::Full { used: self.bytes, max: self.options.max_bytes });
        }
        if rotate {
            self.start_segment()?;
        }
        let (Some(writer), Some(segment)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            unreachable!("start_segment leaves a writer on the last segment");
        };
        if let Err(source) = writer.file.write_all(&record) {
            // A partial record must not be followed by whole ones: cut it off and write the next one elsewhere.
            let _ = writer.file.set_len(segment.len);
            self.writer = None;
            return Err(SpoolError::Io { what: "write", path: segment.path.clone(), source });
        }
        segment.len += len;
        self.bytes += len;
        writer.dirty = true;
        let due = match self.options.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Every(period) => writer.last_sync.elapsed() >= period,
            FsyncPolicy::Never => false,
        };
        if due {
            self.sync()?;
        }
        self.report();
        Ok(())
    }

    /// Forces appended records to disk (the `Every` policy calls this on a timer, shutdown calls it once).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        let (Some(writer), Some(segment)) = (self.writer.as_mut(), self.segments.back()) else {
            return Ok(());
        };
        if writer.dirty {
            if let Err(source) = writer.file.sync_data() {
                // Linux reports a failed writeback once: a later fsync of the same file would succeed without
                // making those pages durable, so the next record goes to a new segment.
                self.writer = None;
                return Err(SpoolError::Io { what: "fsync", path: segment.path.clone(), source });
            }
            writer.dirty = false;
        }
        writer.last_sync = Instant::now();
        Ok(())
    }

    /// Up to `max` records from the head, in order, each with the cursor just past it, stopping once their payloads
    /// reach `max_bytes`. Nothing is consumed but torn or corrupt bytes at the head with no whole record read after
    /// them: they would be read again forever, and a spool holding only those would never count as empty, so replay
    /// would never end. An error of the process rather than of a segment (out of file descriptors or memory) fails
    /// the read, to be tried again; a segment that cannot be read is set aside.
    pub fn read(&mut self, max: usize, max_bytes: usize) -> Result<Vec<(SpooledMessage, Cursor)>, SpoolError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut offset = self.head_offset;
        let mut index = 0;
        let mut file: Option<(u64, File)> = None;
        let mut skipped_to = None;
        while out.len() < max && bytes < max_bytes && index < self.segments.len() {
            let (seq, len, path) = {
                let s = &self.segments[index];
                (s.seq, s.len, s.path.clone())
            };
            if offset >= len {
                // Read to its end, or holding no record at all (a segment whose first write failed, or a crash
                // right after a rotation): passed, and consumed with the rest if nothing after it is read.
                skipped_to = Some(Cursor { seq, offset: len });
                index += 1;
                offset = HEADER_LEN;
                continue;
            }
            let reader = match &mut file {
                Some((open, reader)) if *open == seq => reader,
                _ => match File::open(&path).and_then(|mut f| has_magic(&mut f).map(|magic| (f, magic))) {
                    Ok((opened, true)) => &mut file.insert((seq, opened)).1,
                    Ok((_, false)) => {
                        self.count_corrupt(Cursor { seq, offset: 0 });
                        offset = len;
                        skipped_to = Some(Cursor { seq, offset });
                        continue;
                    }
                    Err(e) if of_the_process(&e) => return Err(SpoolError::Io { what: "open", path, source: e }),
                    Err(e) => {
                        self.set_aside(index, "read", &e);
                        offset = HEADER_LEN;
                        continue;
                    }
                },
            };
            let at = Cursor { seq, offset };
            let record = reader.seek(SeekFrom::Start(offset)).and_then(|_| read_record(reader, len - offset));
            let record = match record {
                Ok(record) => record,
                Err(e) if of_the_process(&e) => return Err(SpoolError::Io { what: "read", path, source: e }),
                Err(e) => {
                    file = None;
                    self.set_aside(index, "read", &e);
                    offset = HEADER_LEN;
                    continue;
                }
            };
            match record {
                Record::Whole(message, used) => {
                    offset += used;
                    bytes += message.payload.len();
                    out.push((message, Cursor { seq, offset }));
                }
                Record::Corrupt(used) => {
                    self.count_corrupt(at);
                    offset += used;
                    skipped_to = Some(Cursor { seq, offset });
                }
                Record::TornTail => {
                    self.count_corrupt(at);
                    offset = len;
                    skipped_to = Some(Cursor { seq, offset });
                }
            }
        }
        if let (true, Some(cursor)) = (out.is_empty(), skipped_to) {
            self.consume_to(cursor);
        }
        Ok(out)
    }

    /// Marks everything before `cursor` as delivered, deleting segments that are wholly behind it.
    pub fn consume_to(&mut self, cursor: Cursor) {
        while let Some(front) = self.segments.front() {
            let done = front.seq < cursor.seq || (front.seq == cursor.seq && cursor.offset >= front.len);
            if !done {
                break;
            }
            match fs::remove_file(&front.path) {
                Ok(()) => self.drop_segment(0),
                // Deleted by hand already: what it held was replayed all the same.
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.drop_segment(0),
                Err(e) => self.set_aside(0, "delete", &e),
            }
        }
        if self.segments.front().is_some_and(|f| f.seq == cursor.seq) {
            self.head_offset = cursor.offset;
        }
        self.report();
    }

    /// Leaves the segment at `index` out of this run (see the module's comment): it stays on disk, unless it is gone
    /// already, and is read again at the next start.
    fn set_aside(&mut self, index: usize, what: &str, error: &io::Error) {
        let path = self.segments[index].path.clone();
        if error.kind() == io::ErrorKind::NotFound {
            tracing::error!(segment = %path.display(), "a spool segment was deleted by hand; the events in it are lost");
        } else {
            tracing::error!(segment = %path.display(), %error,
                "cannot {what} a spool segment; set aside until the next start, which reads it again");
        }
        metrics::counter!(SPOOL_CORRUPT_RECORDS).increment(1);
        self.drop_segment(index);
    }

    /// Forgets the segment at `index`, and its writer if it had one.
    fn drop_segment(&mut self, index: usize) {
        if index + 1 == self.segments.len() {
            self.writer = None;
        }
        if let Some(segment) = self.segments.remove(index) {
            self.bytes -= segment.len;
        }
        if index == 0 {
            self.head_offset = HEADER_LEN;
        }
        self.report();
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        if self.writer.is_some() {
            self.sync()?;
        }
        let seq = self.next_seq;
        // Taken even if this fails: a file that a failed attempt (a full disk) left behind must not make every later
        // attempt fail too, long after the disk has room again.
        self.next_seq += 1;
        let path = self.dir.join(format!("{seq:020}{SEGMENT_SUFFIX}"));
        let mut file =
            OpenOptions::new().create_new(true).append(true).open(&path).map_err(io_error("create", &path))?;
        let written = file.write_all(MAGIC).map_err(io_error("write", &path)).and_then(|()| {
            if self.options.fsync == FsyncPolicy::Always {
                // The new file's name must survive a crash too, or its synced records would be unreachable.
                File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_error("fsync", &self.dir))?;
            }
            Ok(())
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.bytes += HEADER_LEN;
        self.segments.push_back(Segment { seq, path, len: HEADER_LEN });
        self.writer = Some(Writer { file, dirty: true, last_sync: Instant::now() });
        Ok(())
    }

    fn count_corrupt(&mut self, at: Cursor) {
        if at >= self.counted_until {
            self.counted_until = Cursor { seq: at.seq, offset: at.offset + 1 };
            self.corrupt += 1;
            metrics::counter!(SPOOL_CORRUPT_RECORDS).increment(1);
            let segment = self.dir.join(format!("{:020}{SEGMENT_SUFFIX}", at.seq));
            tracing::error!(segment = %segment.display(), offset = at.offset,
                "skipping a torn or corrupt spool record; the events in it are lost");
        }
    }

    fn report(&self) {
        metrics::gauge!(SPOOL_BYTES).set(self.bytes as f64);
        metrics::gauge!(SPOOL_SEGMENTS).set(self.segments.len() as f64);
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "cannot fsync the spool on close");
        }
    }
}

/// Takes the directory's advisory lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_error("open", &path))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "pid unknown".to_owned(),
                pid => format!("pid {pid}"),
            };
            return Err(SpoolError::Locked { dir: dir.to_owned(), holder });
        }
        Err(e) => return Err(SpoolError::Io { what: "lock", path, source: e.into() }),
    }
    // Only informative (the lock is what counts), so an operator can see who holds it.
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(io_error("write", &path))?;
    Ok(file)
}

/// Whether `error` says the process is short of something (file descriptors, memory) rather than that a file is
/// unreadable: every segment would fail alike, and none should be set aside for it.
fn of_the_process(error: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(Errno::from_io_error(error), Some(Errno::MFILE | Errno::NFILE | Errno::NOMEM))
}

fn record_len(message: &SpooledMessage) -> u64 {
    RECORD_HEADER_LEN + 4 + 1 + message.id.len() as u64 + message.payload.len() as u64
}

fn encode_record(message: &SpooledMessage) -> Vec<u8> {
    // Message ids are UUIDs (36 bytes); a longer one is a bug in the caller.
    let id_len = u8::try_from(message.id.len()).expect("a message id is at most 255 bytes");
    let mut body = Vec::with_capacity(record_len(message) as usize);
    body.extend_from_slice(&[0; RECORD_HEADER_LEN as usize]);
    body.extend_from_slice(&message.events.to_le_bytes());
    body.push(id_len);
    body.extend_from_slice(message.id.as_bytes());
    body.extend_from_slice(&message.payload);
    let len = (body.len() as u64 - RECORD_HEADER_LEN) as u32;
    let crc = crc32fast::hash(&body[RECORD_HEADER_LEN as usize..]);
    body[0..4].copy_from_slice(&len.to_le_bytes());
    body[4..8].copy_from_slice(&crc.to_le_bytes());
    body
}

enum Record {
    /// A good record and the bytes it took.
    Whole(SpooledMessage, u64),
    /// A record whose length is plausible but whose body is not what was written; skip this many bytes.
    Corrupt(u64),
    /// The rest of the segment is not a record (cut short by a crash, or a garbage length).
    TornTail,
}

fn has_magic(file: &mut File) -> io::Result<bool> {
    let mut magic = [0; MAGIC.len()];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads the record at the file's position, with `remaining` bytes left in the segment.
fn read_record(file: &mut File, remaining: u64) -> io::Result<Record> {
    if remaining < RECORD_HEADER_LEN {
        return Ok(Record::TornTail);
    }
    let mut header = [0; RECORD_HEADER_LEN as usize];
    file.read_exact(&mut header)?;
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    // Shorter than any record (its events and id length): zeros, as a crash can leave at the end of a file that was
    // not synced, not thousands of 8-byte corrupt records.
    if !(5..=MAX_RECORD_LEN).contains(&len) || RECORD_HEADER_LEN + u64::from(len) > remaining {
        return Ok(Record::TornTail);
    }
    let used = RECORD_HEADER_LEN + u64::from(len);
    let mut body = vec![0; len as usize];
    file.read_exact(&mut body)?;
    if crc32fast::hash(&body) != crc {
        return Ok(Record::Corrupt(used));
    }
    Ok(decode_body(body).map_or(Record::Corrupt(used), |m| Record::Whole(m, used)))
}

fn decode_body(body: Vec<u8>) -> Option<SpooledMessage> {
    let events = u32::from_le_bytes(body.get(0..4)?.try_into().ok()?);
    let id_len = usize::from(*body.get(4)?);
    let id = std::str::from_utf8(body.get(5..5 + id_len)?).ok()?.to_owned();
    let payload = Bytes::from(body).slice(5 + id_len..);
    Some(SpooledMessage { id, events, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u32) -> SpooledMessage {
        SpooledMessage { id: format!("id-{n}"), events: n, payload: Bytes::from(vec![n as u8; 100 + n as usize]) }
    }

    fn options() -> SpoolOptions {
        SpoolOptions { max_bytes: 1 << 20, segment_bytes: 1000, fsync: FsyncPolicy::Always }
    }

    /// A spool in `dir` holding `count` messages, `message(0)` first.
    fn holding(dir: &Path, count: u32) -> Spool {
        let mut spool = Spool::open(dir, options()).expect("open");
        for n in 0..count {
            spool.append(&message(n)).expect("append");
        }
        spool
    }

    /// Reads and consumes everything.
    fn drain(spool: &mut Spool) -> Vec<SpooledMessage> {
        let mut all = Vec::new();
        loop {
            let batch = spool.read(3, usize::MAX).expect("read");
            let Some((_, last)) = batch.last() else { break };
            spool.consume_to(*last);
            all.extend(batch.into_iter().map(|(m, _)| m));
        }
        all
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_read_stops_once_its_payloads_reach_the_bytes_asked_for() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spool = holding(dir.path(), 5);
        // Payloads of 100, 101, 102… bytes: the second reaches 150, and a read always takes one.
        let read = |spool: &mut Spool, bytes| spool.read(16, bytes).expect("read").len();
        assert_eq!(read(&mut spool, 150), 2);
        assert_eq!(read(&mut spool, 201), 2);
        assert_eq!(read(&mut spool, 202), 3);
        assert_eq!(read(&mut spool, 1), 1);
        assert_eq!(read(&mut spool, usize::MAX), 5);
    }

    #[test]
    fn messages_come_back_in_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let mut spool = Spool::open(dir.path(), options()).expect("open");
            assert!(spool.is_empty());
            for n in 0..20 {
                spool.append(&message(n)).expect("append");
            }
            assert!(spool.segments() > 2, "small segments rotate");
            let first = spool.read(2, usize::MAX).expect("read");
            assert_eq!(first.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(), vec![message(0), message(1)]);
            spool.consume_to(first[1].1);
        }
        let mut spool = Spool::open(dir.path(), options()).expect("reopen");
        spool.append(&message(20)).expect("append after reopen");
        let all = drain(&mut spool);
        // The consumed head is not persisted: a restart replays the oldest segment again, which dedupe absorbs.
        let ids: Vec<u32> = all.iter().map(|m| m.events).collect();
        let expected_tail: Vec<u32> = (2..=20).collect();
        assert!(ids.ends_with(&expected_tail), "{ids:?}");
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert!(segment_files(dir.path()).is_empty(), "consumed segments are deleted");
        assert_eq!(spool.corrupt_records(), 0);
    }

    #[test]
    fn a_segment_that_cannot_be_read_is_set_aside_for_the_run_and_read_again_at_the_next_start() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spool = holding(dir.path(), 20);
        let files = segment_files(dir.path());
        assert!(files.len() >= 3, "small segments rotate");
        // The second segment cannot be read (a directory in its place: opening works, reading fails).
        let kept = fs::read(&files[1]).expect("read");
        fs::remove_file(&files[1]).expect("remove");
        fs::create_dir(&files[1]).expect("a directory in its place");

        let read: Vec<u32> = drain(&mut spool).iter().map(|m| m.events).collect();
        assert!(!read.is_empty() && read.ends_with(&[19]), "the segments after it are read: {read:?}");
        assert!(spool.is_empty(), "the replay ends");
        assert_eq!(spool.bytes(), 0);
        assert!(files[1].is_dir(), "set aside, not deleted");
        drop(spool);

        // Readable again at the next start: its messages come back, and only they.
        fs::remove_dir(&files[1]).expect("remove the directory");
        fs::write(&files[1], kept).expect("restore");
        let mut spool = Spool::open(dir.path(), options()).expect("reopen");
        let set_aside: Vec<u32> = drain(&mut spool).iter().map(|m| m.events).collect();
        let mut all = [read, set_aside.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<u32>>(), "{set_aside:?}");
        assert_eq!(spool.corrupt_records(), 0);
    }

    #[test]
    fn only_errors_of_the_process_fail_a_read_rather_than_set_a_segment_aside() {
        use rustix::io::Errno;
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOMEM] {
            assert!(of_the_process(&io::Error::from_raw_os_error(errno.raw_os_error())), "{errno:?}");
        }
        for errno in [Errno::NOENT, Errno::ISDIR, Errno::IO, Errno::ACCESS] {
            assert!(!of_the_process(&io::Error::from_raw_os_error(errno.raw_os_error())), "{errno:?}");
        }
    }

    #[test]
    fn segments_deleted_by_hand_hold_up_nothing_whether_replayed_or_not() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spool = holding(dir.path(), 20);
        let files = segment_files(dir.path());
        let first = spool.read(2, usize::MAX).expect("read");
        // The first segment, being replayed, and the second, not yet read, are deleted by hand.
        fs::remove_file(&files[0]).expect("remove");
        fs::remove_file(&files[1]).expect("remove");
        spool.consume_to(first[1].1);
        let rest: Vec<u32> = drain(&mut spool).iter().map(|m| m.events).collect();
        assert!(rest.ends_with(&[19]) && !rest.contains(&1), "{rest:?}");
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert!(segment_files(dir.path()).is_empty());
        // The writer's segment went too: the next message starts a new one.
        spool.append(&message(20)).expect("append");
        assert_eq!(drain(&mut spool), vec![message(20)]);
    }

    #[test]
    fn a_segment_that_could_not_be_started_does_not_stop_the_next() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spool = Spool::open(dir.path(), options()).expect("open");
        // What a rotation that failed half-way (a full disk) leaves: a file with the next segment's name.
        fs::write(dir.path().join(format!("{:020}{SEGMENT_SUFFIX}", 1)), b"").expect("leftover");
        assert!(spool.append(&message(1)).is_err());
        spool.append(&message(2)).expect("the next append starts the next segment");
        assert_eq!(drain(&mut spool), vec![message(2)]);
    }

    #[test]
    fn segments_holding_no_record_are_consumed_by_a_read() {
        let dir = tempfile::tempdir().expect("dir");
        // What a crash right after two rotations leaves: two segments with their header alone.
        for seq in [1, 2] {
            fs::write(dir.path().join(format!("{seq:020}{SEGMENT_SUFFIX}")), MAGIC).expect("segment");
        }
        let mut spool = Spool::open(dir.path(), options()).expect("open");
        assert!(!spool.is_empty());
        assert!(spool.read(16, usize::MAX).expect("read").is_empty());
        assert!(spool.is_empty(), "a replay waiting for it to empty would spin for ever");
        assert_eq!(segment_files(dir.path()).len(), 0);
    }

    #[test]
    fn a_torn_tail_is_skipped_and_counted() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let mut spool =
                Spool::open(dir.path(), SpoolOptions { segment_bytes: 1 << 20, ..options() }).expect("open");
            for n in 0..3 {
                spool.append(&message(n)).expect("append");
            }
        }
        let segment = segment_files(dir.path()).pop().expect("a segment");
        let len = fs::metadata(&segment).expect("meta").len();
        // A crash in the middle of the third record.
        OpenOptions::new().write(true).open(&segment).expect("open").set_len(len - 30).expect("truncate");
        let mut spool = Spool::open(dir.path(), options()).expect("reopen");
        spool.append(&message(3)).expect("append");
        let events: Vec<u32> = drain(&mut spool).iter().map(|m| m.events).collect();
        assert_eq!(events, vec![0, 1, 3]);
        assert_eq!(spool.corrupt_records(), 1);
    }

    #[test]
    fn a_spool_holding_only_a_torn_or_zeroed_tail_is_empty_once_read() {
        for damage in ["torn", "zeros"] {
            let dir = tempfile::tempdir().expect("dir");
            {
                let mut spool = Spool::open(dir.path(), options()).expect("open");
                spool.append(&message(1)).expect("append");
                let batch = spool.read(1, usize::MAX).expect("read");
                spool.consume_to(batch[0].1);
                spool.append(&message(2)).expect("append");
            }
            let segment = segment_files(dir.path()).pop().expect("a segment");
            let file = OpenOptions::new().append(true).open(&segment).expect("open");
            match damage {
                // A crash in the middle of the record: nothing whole is left.
                "torn" => file.set_len(HEADER_LEN + 30).expect("truncate"),
                // Power lost before the file's blocks were written: they read back as zeros.
                _ => {
                    file.set_len(HEADER_LEN).expect("truncate");
                    (&file).write_all(&[0; 4096]).expect("zeros");
                }
            }
            let mut spool = Spool::open(dir.path(), options()).expect("reopen");
            assert!(!spool.is_empty());
            assert!(spool.read(16, usize::MAX).expect("read").is_empty(), "{damage}");
            assert!(spool.is_empty(), "{damage}: nothing is left to replay");
            assert_eq!(spool.corrupt_records(), 1, "{damage}: counted once");
            assert!(segment_files(dir.path()).is_empty(), "{damage}: the segment is deleted");
        }
    }

    #[test]
    fn a_record_failing_its_checksum_is_skipped_and_the_rest_are_read() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let mut spool =
                Spool::open(dir.path(), SpoolOptions { segment_bytes: 1 << 20, ..options() }).expect("open");
            for n in 0..3 {
                spool.append(&message(n)).expect("append");
            }
        }
        let segment = segment_files(dir.path()).pop().expect("a segment");
        let mut bytes = fs::read(&segment).expect("read");
        // Flip a payload byte of the second record.
        let second = HEADER_LEN + record_len(&message(0));
        bytes[(second + RECORD_HEADER_LEN + 20) as usize] ^= 0xff;
        fs::write(&segment, bytes).expect("write");
        let mut spool = Spool::open(dir.path(), options()).expect("reopen");
        // Read twice (as a failed publish would): the bad record is counted once.
        assert_eq!(spool.read(10, usize::MAX).expect("read").len(), 2);
        let events: Vec<u32> = drain(&mut spool).iter().map(|m| m.events).collect();
        assert_eq!(events, vec![0, 2]);
        assert_eq!(spool.corrupt_records(), 1);
    }

    #[test]
    fn the_bound_is_enforced_and_consuming_makes_room() {
        let dir = tempfile::tempdir().expect("dir");
        let options = SpoolOptions { max_bytes: 2000, segment_bytes: 500, fsync: FsyncPolicy::Never };
        let mut spool = Spool::open(dir.path(), options).expect("open");
        let mut appended = 0;
        while spool.has_room_for(&message(1)) {
            spool.append(&message(1)).expect("append");
            appended += 1;
        }
        assert!(appended >= 10, "{appended}");
        assert!(matches!(spool.append(&message(1)), Err(SpoolError::Full { .. })));
        assert!(spool.bytes() <= 2000);
        let batch = spool.read(5, usize::MAX).expect("read");
        spool.consume_to(batch[4].1);
        assert!(spool.has_room_for(&message(1)), "consumed segments free their space");
        spool.append(&message(1)).expect("append after consuming");
    }

    #[test]
    fn a_second_process_is_refused_with_a_message_that_says_why() {
        let dir = tempfile::tempdir().expect("dir");
        let first = Spool::open(dir.path(), options()).expect("open");
        let refused = Spool::open(dir.path(), options()).err().expect("second open refused");
        let message = refused.to_string();
        assert!(message.contains("in use by another Tollgate process"), "{message}");
        assert!(message.contains(&format!("pid {}", std::process::id())), "{message}");
        assert!(message.contains("TOLLGATE_SPOOL_DIR"), "{message}");
        drop(first);
        Spool::open(dir.path(), options()).expect("free again once the holder is gone");
    }
}

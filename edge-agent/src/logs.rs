//! Container logs on the device: keeps each `{data}/logs/{pod}/{container}.log`
//! under its size cap by rotating it in place, and reads logs back (the last
//! N lines, from a cursor, a capped number of bytes) for `flotilla logs`.
//!
//! The container itself holds the live file open (`O_APPEND`, given to it as
//! stdout and stderr by the runtime), so the file cannot be renamed away:
//! rotation copies the head of the file to `{container}.log.{generation}` and
//! then removes that head from the live file in place. Where the filesystem
//! can (ext4, xfs), the head is removed with `FALLOC_FL_COLLAPSE_RANGE`,
//! which loses nothing: the copied bytes are never written again (the writer
//! only appends) and whatever the container appended meanwhile lies beyond the
//! collapsed range. Elsewhere (tmpfs, …) it falls back to copy-then-truncate,
//! which can lose what the container writes in the microseconds between the
//! last copy and the truncate. A pipe read by the agent would lose nothing
//! either, but it would tie every container's output to the agent process:
//! a container whose agent is restarting would block on a full pipe, and die
//! of SIGPIPE when the agent that held the read end is gone.
//!
//! Generations number the live file's contents: the live file holds
//! generation `g`, `{container}.log.{k}` holds generation `k` (`g` is the
//! highest rotated number plus one), so nothing else need be stored and it all
//! survives an agent restart. A [`LogCursor`] is a generation and an offset
//! in it; the offset of generation `k` continues into `k + 1` past the length
//! of `{container}.log.{k}`, which is how a follower crosses a rotation.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::{LogCursor, LogsRequest, NameError, check_name};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most bytes sent in one response: a response frame is capped at 256 KiB.
pub const MAX_CHUNK: u32 = 192 * 1024;
/// Smallest size cap accepted: rotation cuts whole filesystem blocks.
pub const MIN_MAX_BYTES: u64 = 64 * 1024;
/// How often the log files are checked against their cap.
pub const ROTATE_EVERY: Duration = Duration::from_secs(1);
/// Rotations of one file in one pass, at most.
const MAX_ROTATIONS_PER_PASS: usize = 16;
/// Backward scans for `tail` read this much at a time.
const SCAN_BLOCK: u64 = 64 * 1024;

/// What can go wrong with logs.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// A pod or container name in a request breaks the name rule (names
    /// become paths).
    #[error("{what} name {name:?}: {error}")]
    Name {
        what: &'static str,
        name: String,
        error: NameError,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogsError + '_ {
    move |source| LogsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How big logs may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// A live file at or above this size is rotated.
    pub max_bytes: u64,
    /// Rotated files kept per container, besides the live one (at least 1).
    pub kept_files: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            kept_files: 2,
        }
    }
}

/// A piece of a log and where the next piece starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The bytes, as the container wrote them.
    pub data: Vec<u8>,
    /// Where to continue.
    pub next: LogCursor,
}

/// The logs under `{data}/logs`. All methods block: call them from blocking
/// threads.
#[derive(Debug)]
pub struct Logs {
    root: PathBuf,
    limits: LogLimits,
    /// Rotation and reading exclude each other, so a reader never maps a
    /// cursor against files that are being shifted.
    lock: Mutex<()>,
    /// Cleared the first time the filesystem refuses to collapse a range.
    collapse: AtomicBool,
}

/// One file of a container's log, oldest first; the last one is the live file.
#[derive(Debug, Clone)]
struct Segment {
    generation: u64,
    path: PathBuf,
    len: u64,
}

impl Logs {
    /// Logs under `{data_dir}/logs`.
    pub fn new(data_dir: &Path, limits: LogLimits) -> Self {
        Self {
            root: data_dir.join("logs"),
            limits: LogLimits {
                max_bytes: limits.max_bytes.max(MIN_MAX_BYTES),
                kept_files: limits.kept_files.max(1),
            },
            lock: Mutex::new(()),
            collapse: AtomicBool::new(true),
        }
    }

    /// Rotates every live file at or above the cap; returns how many were
    /// rotated. A file that fails is logged and skipped.
    pub fn rotate_all(&self) -> usize {
        let mut rotated = 0;
        let Ok(pods) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        for pod in pods.flatten() {
            let Ok(files) = std::fs::read_dir(pod.path()) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(container) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
                    continue;
                };
                // A burst can leave more than a cap in the live file after
                // one rotation (each rotated file holds at most a cap): go on
                // while it is over; the loop is bounded all the same.
                for _ in 0..MAX_ROTATIONS_PER_PASS {
                    match self.rotate(&pod.path(), container) {
                        Ok(true) => rotated += 1,
                        Ok(false) => break,
                        // The pod's directory may be going away under us.
                        Err(LogsError::Io { source, .. })
                            if source.kind() == io::ErrorKind::NotFound =>
                        {
                            break;
                        }
                        Err(e) => {
                            tracing::warn!("rotating logs: {e}");
                            break;
                        }
                    }
                }
            }
        }
        rotated
    }

    /// Rotates `{dir}/{container}.log` if it reached the cap.
    fn rotate(&self, dir: &Path, container: &str) -> Result<bool, LogsError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let live_path = dir.join(format!("{container}.log"));
        let live = match OpenOptions::new().read(true).write(true).open(&live_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(&live_path)(e)),
        };
        let size = live.metadata().map_err(io_err(&live_path))?.len();
        if size < self.limits.max_bytes {
            return Ok(false);
        }
        let segments = segments(dir, container, &live_path).map_err(io_err(dir))?;
        let generation = segments.last().map_or(0, |s| s.generation);
        // Pruning first keeps the disk use under the cap times (1 + kept
        // files) while the new rotated file is written.
        self.prune(dir, container, generation);
        let target = dir.join(format!("{container}.log.{generation}"));
        let tmp = dir.join(format!("{container}.log.{generation}.tmp"));
        let mut out = File::create(&tmp).map_err(io_err(&tmp))?;

        let cut = if self.collapse.load(Ordering::Relaxed) {
            collapsible(&live, size, self.limits.max_bytes)
        } else {
            0
        };
        let mut copied = 0;
        if cut > 0 {
            copied = copy_range(&live, &mut out, 0, Some(cut)).map_err(io_err(&live_path))?;
            // The copy must be on disk before its bytes leave the live file.
            commit(&out, &tmp, &target, dir).map_err(io_err(&target))?;
            match collapse_head(&live, cut) {
                Ok(()) => {
                    tracing::debug!(path = %live_path.display(), generation, cut, "log rotated (collapse)");
                    return Ok(true);
                }
                // EINVAL too: a filesystem whose collapse alignment is not
                // what statvfs says would otherwise never rotate.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    tracing::info!(
                        "{}: the filesystem cannot collapse a range; rotating logs by copy and truncate",
                        self.root.display()
                    );
                    self.collapse.store(false, Ordering::Relaxed);
                    out = OpenOptions::new()
                        .append(true)
                        .open(&target)
                        .map_err(io_err(&target))?;
                }
                Err(e) => return Err(io_err(&live_path)(e)),
            }
        }
        // Copy then truncate: copy to the end, flush, copy what arrived
        // meanwhile, and truncate at once, so the window in which an
        // appended line is lost is as short as it can be.
        let mut end = copied;
        end += copy_range(&live, &mut out, end, None).map_err(io_err(&live_path))?;
        if copied == 0 {
            commit(&out, &tmp, &target, dir).map_err(io_err(&target))?;
        } else {
            out.sync_all().map_err(io_err(&target))?;
        }
        copy_range(&live, &mut out, end, None).map_err(io_err(&live_path))?;
        live.set_len(0).map_err(io_err(&live_path))?;
        tracing::debug!(path = %live_path.display(), generation, "log rotated (copy and truncate)");
        Ok(true)
    }

    /// Removes the rotated files that will be older than the kept ones once
    /// generation `newest` is rotated.
    fn prune(&self, dir: &Path, container: &str, newest: u64) {
        let Ok(segments) = segments(dir, container, &dir.join(format!("{container}.log"))) else {
            return;
        };
        let keep_from = newest.saturating_sub(u64::from(self.limits.kept_files) - 1);
        let rotated = &segments[..segments.len().saturating_sub(1)];
        for s in rotated.iter().filter(|s| s.generation < keep_from) {
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!("removing old log {}: {e}", s.path.display());
            }
        }
    }

    /// The first whole line kept. Once older generations were pruned, the
    /// oldest file kept starts where a collapse cut the log: on a block
    /// boundary, most likely inside a line.
    fn oldest_line(&self, segments: &[Segment]) -> io::Result<(usize, u64)> {
        let oldest = &segments[0];
        if oldest.generation == 0 || !self.collapse.load(Ordering::Relaxed) {
            return Ok((0, 0));
        }
        let mut head = Vec::new();
        File::open(&oldest.path)?
            .take(SCAN_BLOCK)
            .read_to_end(&mut head)?;
        Ok(match head.iter().position(|&b| b == b'\n') {
            Some(i) => (0, i as u64 + 1),
            None => (0, 0),
        })
    }

    /// Reads the part of a log that `request` asks for. A container that has
    /// written nothing yet (or does not exist yet) has an empty log.
    pub fn read(&self, request: &LogsRequest) -> Result<LogChunk, LogsError> {
        check(&request.pod, "pod")?;
        check(&request.container, "container")?;
        let dir = self.root.join(&request.pod);
        let live_path = dir.join(format!("{}.log", request.container));
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let inode = match std::fs::metadata(&live_path) {
            Ok(m) => m.ino(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(LogChunk {
                    data: Vec::new(),
                    next: LogCursor {
                        file_id: 0,
                        offset: 0,
                    },
                });
            }
            Err(e) => return Err(io_err(&live_path)(e)),
        };
        let segments = segments(&dir, &request.container, &live_path).map_err(io_err(&dir))?;
        let start = match (&request.from, request.tail_lines) {
            (Some(cursor), _) => locate(&segments, inode, *cursor),
            (None, Some(lines)) => tail_start(&segments, lines).map_err(io_err(&dir))?,
            (None, None) => None,
        };
        let start = match start {
            Some(start) => start,
            None => self.oldest_line(&segments).map_err(io_err(&dir))?,
        };
        let max = u64::from(request.max_bytes.min(MAX_CHUNK));
        let data = read_from(&segments, start, max)?;
        let (index, offset) = advance(&segments, start, data.len() as u64);
        Ok(LogChunk {
            data,
            next: LogCursor {
                file_id: file_id(inode, segments[index].generation),
                offset,
            },
        })
    }
}

/// Runs [`Logs::rotate_all`] every [`ROTATE_EVERY`] until `shutdown`, on a
/// blocking thread of its own for the agent's whole life. A pass handed to
/// the blocking pool every second would keep one pooled thread from ever
/// idling out, and with it whatever stack a container start had touched on
/// that thread (~100 KiB of resident memory).
pub fn spawn_rotation(logs: Arc<Logs>, tracker: &TaskTracker, shutdown: CancellationToken) {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    tracker.spawn(async move {
        shutdown.cancelled().await;
        drop(stop);
    });
    tracker.spawn_blocking(move || {
        loop {
            logs.rotate_all();
            if stopped.recv_timeout(ROTATE_EVERY) != Err(RecvTimeoutError::Timeout) {
                return;
            }
        }
    });
}

fn check(name: &str, what: &'static str) -> Result<(), LogsError> {
    check_name(name).map_err(|error| LogsError::Name {
        what,
        name: name.to_owned(),
        error,
    })
}

/// The live file's inode in the high half (a log removed and made again is
/// another log), the generation in the low half.
fn file_id(inode: u64, generation: u64) -> u64 {
    (inode & 0xffff_ffff) << 32 | (generation & 0xffff_ffff)
}

/// The rotated files of `container`, oldest first, then the live file.
fn segments(dir: &Path, container: &str, live: &Path) -> io::Result<Vec<Segment>> {
    let prefix = format!("{container}.log.");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(|n| n.strip_prefix(prefix.as_str())) else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue; // `.tmp` files and anything else
        }
        let Ok(generation) = n.parse::<u64>() else {
            continue;
        };
        out.push(Segment {
            generation,
            path: entry.path(),
            len: entry.metadata()?.len(),
        });
    }
    out.sort_by_key(|s| s.generation);
    let generation = out.last().map_or(0, |s| s.generation + 1);
    out.push(Segment {
        generation,
        path: live.to_owned(),
        len: std::fs::metadata(live)?.len(),
    });
    Ok(out)
}

/// Where `cursor` points now, as (segment index, offset); `None` for a
/// cursor from another log, or one whose generation was pruned (the reader
/// starts again at the oldest line kept).
fn locate(segments: &[Segment], inode: u64, cursor: LogCursor) -> Option<(usize, u64)> {
    let last = segments.len() - 1;
    if cursor.file_id >> 32 != inode & 0xffff_ffff {
        return None;
    }
    let generation = cursor.file_id & 0xffff_ffff;
    let mut index = segments
        .iter()
        .position(|s| s.generation & 0xffff_ffff == generation)?;
    let mut offset = cursor.offset;
    while index < last && offset >= segments[index].len {
        offset -= segments[index].len;
        index += 1;
    }
    if offset > segments[index].len {
        // The live file shrank without a rotation: someone truncated it.
        offset = 0;
    }
    Some((index, offset))
}

/// The position `n` bytes after `from`, moved past the end of rotated files.
fn advance(segments: &[Segment], from: (usize, u64), mut n: u64) -> (usize, u64) {
    let last = segments.len() - 1;
    let (mut index, mut offset) = from;
    loop {
        let room = segments[index].len.saturating_sub(offset);
        if n < room || index == last {
            return (index, offset + n);
        }
        n -= room;
        index += 1;
        offset = 0;
    }
}

/// Up to `max` bytes from `from`, across files.
fn read_from(segments: &[Segment], from: (usize, u64), max: u64) -> Result<Vec<u8>, LogsError> {
    let mut data = Vec::new();
    let (mut index, mut offset) = from;
    while index < segments.len() && (data.len() as u64) < max {
        let s = &segments[index];
        let want = s.len.saturating_sub(offset).min(max - data.len() as u64);
        if want > 0 {
            let mut file = File::open(&s.path).map_err(io_err(&s.path))?;
            file.seek(SeekFrom::Start(offset))
                .map_err(io_err(&s.path))?;
            file.take(want)
                .read_to_end(&mut data)
                .map_err(io_err(&s.path))?;
        }
        index += 1;
        offset = 0;
    }
    Ok(data)
}

/// The start of the last `lines` lines (`None`: there are fewer). A final
/// newline ends the last line rather than starting an empty one.
fn tail_start(segments: &[Segment], lines: u32) -> io::Result<Option<(usize, u64)>> {
    let last = segments.len() - 1;
    let end = (last, segments[last].len);
    if lines == 0 {
        return Ok(Some(end));
    }
    let mut seen = 0u32;
    let mut first = true;
    let mut buf = vec![0u8; SCAN_BLOCK as usize];
    for index in (0..segments.len()).rev() {
        let s = &segments[index];
        let mut file = File::open(&s.path)?;
        let mut hi = s.len;
        while hi > 0 {
            let lo = hi.saturating_sub(SCAN_BLOCK);
            let block = &mut buf[..(hi - lo) as usize];
            file.seek(SeekFrom::Start(lo))?;
            file.read_exact(block)?;
            for (i, &b) in block.iter().enumerate().rev() {
                if b != b'\n' {
                    first = false;
                    continue;
                }
                if first {
                    first = false;
                    continue;
                }
                seen += 1;
                if seen == lines {
                    return Ok(Some((index, lo + i as u64 + 1)));
                }
            }
            hi = lo;
        }
    }
    Ok(None)
}

/// How much of the head of a `size`-byte file to collapse: whole filesystem
/// blocks, at most `cap` bytes (so a rotated file stays under the cap), and
/// never the last byte (collapsing up to the end is refused).
// statvfs fields are `c_ulong`/`fsblkcnt_t`: u32 on 32-bit ARM, u64 here.
#[allow(clippy::useless_conversion)]
fn collapsible(file: &File, size: u64, cap: u64) -> u64 {
    let block = nix::sys::statvfs::fstatvfs(file)
        .map(|s| u64::from(s.block_size()))
        .unwrap_or(4096)
        .max(512);
    (size.saturating_sub(1).min(cap) / block) * block
}

fn collapse_head(file: &File, len: u64) -> io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let len = i64::try_from(len).map_err(io::Error::other)?;
    fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
        0,
        len,
    )
    .map_err(io::Error::from)
}

/// Copies `src[from..to]` (to its end when `to` is `None`) to the end of
/// `dst`; returns the bytes copied.
fn copy_range(src: &File, dst: &mut File, from: u64, to: Option<u64>) -> io::Result<u64> {
    let mut reader = src;
    reader.seek(SeekFrom::Start(from))?;
    match to {
        Some(to) => io::copy(&mut reader.take(to.saturating_sub(from)), dst),
        None => io::copy(&mut reader, dst),
    }
}

/// Flushes the rotated copy and gives it its final name.
fn commit(out: &File, tmp: &Path, target: &Path, dir: &Path) -> io::Result<()> {
    out.sync_all()?;
    std::fs::rename(tmp, target)?;
    File::open(dir)?.sync_all()
}

/// Parses a size: bytes, or with `Ki`, `Mi`, `Gi` (1024) or `k`, `M`, `G` (1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number of bytes, or with Ki, Mi, Gi"))?;
    let mul: u64 = match unit {
        "" => 1,
        "k" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => {
            return Err(format!(
                "size {s:?}: unknown unit {unit:?}, expected Ki, Mi, Gi, k, M or G"
            ));
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?}: too large"))
}

#[cfg(test)]
mod tests;

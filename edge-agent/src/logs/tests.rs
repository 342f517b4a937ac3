//! Rotation and reading of real files in temp dirs, a writer racing the
//! rotation included.

use std::io::Write;

use super::*;

const CAP: u64 = 64 * 1024;

struct Fixture {
    _dir: tempfile::TempDir,
    logs: Logs,
    pod_dir: PathBuf,
    live: PathBuf,
}

fn fixture(kept_files: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::new(
        dir.path(),
        LogLimits {
            max_bytes: CAP,
            kept_files,
        },
    );
    let pod_dir = dir.path().join("logs").join("web");
    std::fs::create_dir_all(&pod_dir).unwrap();
    let live = pod_dir.join("main.log");
    Fixture {
        _dir: dir,
        logs,
        pod_dir,
        live,
    }
}

/// Appends lines `from..to` the way a container does (O_APPEND).
fn write_lines(path: &Path, from: u64, to: u64) {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    let mut text = String::new();
    for i in from..to {
        text.push_str(&format!("line {i:08} {}\n", "x".repeat(40)));
    }
    f.write_all(text.as_bytes()).unwrap();
}

fn request(from: Option<LogCursor>, tail: Option<u32>, max: u32) -> LogsRequest {
    LogsRequest {
        pod: "web".into(),
        container: "main".into(),
        tail_lines: tail,
        from,
        max_bytes: max,
    }
}

/// Everything from `start` to the end, in chunks; and the final cursor.
fn read_all(logs: &Logs, start: LogsRequest) -> (String, LogCursor) {
    let mut chunk = logs.read(&start).unwrap();
    let mut text = chunk.data.clone();
    while !chunk.data.is_empty() {
        chunk = logs.read(&request(Some(chunk.next), None, 10_000)).unwrap();
        text.extend_from_slice(&chunk.data);
    }
    (String::from_utf8(text).unwrap(), chunk.next)
}

fn numbers(text: &str) -> Vec<u64> {
    text.lines()
        .map(|l| l[5..13].parse::<u64>().unwrap())
        .collect()
}

fn disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn check_rotation(f: &Fixture) {
    let mut written = 0;
    for _ in 0..40 {
        write_lines(&f.live, written, written + 100);
        written += 100;
        f.logs.rotate_all();
        // Rotation cuts whole blocks: the live file keeps less than one
        // block beyond a rotation, plus what was written since.
        assert!(disk_usage(&f.pod_dir) <= CAP * 3 + 8192);
    }
    let names: Vec<String> = std::fs::read_dir(&f.pod_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "live and two rotated files: {names:?}");
    // What is kept is an unbroken run of lines ending at the last one
    // written: nothing lost or doubled across rotation boundaries.
    let (text, _) = read_all(&f.logs, request(None, None, 5000));
    assert!(text.starts_with("line "), "starts inside a line");
    let n = numbers(&text);
    assert_eq!(*n.last().unwrap(), written - 1);
    assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "a gap or a repeat");
    assert!(n.len() > 1000, "{} lines kept", n.len());
    assert!(text.len() as u64 > CAP * 2, "the kept files hold little");
}

#[test]
fn rotation_by_collapse_keeps_every_line_and_the_cap() {
    let f = fixture(2);
    check_rotation(&f);
    // A burst of several caps at once: several rotations in one pass,
    // each rotated file within the cap, the live file under it.
    write_lines(&f.live, 10_000, 20_000);
    f.logs.rotate_all();
    for e in std::fs::read_dir(&f.pod_dir).unwrap() {
        let e = e.unwrap();
        let len = e.metadata().unwrap().len();
        assert!(len <= CAP, "{:?}: {len} bytes", e.file_name());
    }
    assert!(disk_usage(&f.pod_dir) <= CAP * 3);
    assert!(
        f.logs.collapse.load(Ordering::Relaxed),
        "this test wants a filesystem that collapses ranges (ext4, xfs)"
    );
}

#[test]
fn rotation_by_copy_and_truncate_keeps_the_cap() {
    let f = fixture(2);
    f.logs.collapse.store(false, Ordering::Relaxed);
    check_rotation(&f);
}

#[test]
fn a_writer_racing_rotation_loses_nothing() {
    let f = fixture(50);
    let live = f.live.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..4000 {
            write_lines(&live, i, i + 1);
        }
    });
    while !writer.is_finished() {
        f.logs.rotate_all();
    }
    writer.join().unwrap();
    f.logs.rotate_all();
    let files = std::fs::read_dir(&f.pod_dir).unwrap().count();
    assert!(files >= 3, "only {files} files: the race was not run");
    let (text, _) = read_all(&f.logs, request(None, None, 7000));
    assert_eq!(numbers(&text), (0..4000).collect::<Vec<_>>());
}

#[test]
fn a_follower_crosses_rotations() {
    let f = fixture(2);
    write_lines(&f.live, 0, 10);
    let (text, mut cursor) = read_all(&f.logs, request(None, None, 100));
    assert_eq!(numbers(&text), (0..10).collect::<Vec<_>>());
    let mut seen = Vec::new();
    let mut written = 10;
    for i in 0..30 {
        write_lines(&f.live, written, written + 150);
        written += 150;
        // Half the time the rotation comes before the follower read.
        if i % 2 == 0 {
            f.logs.rotate_all();
        }
        let (text, next) = read_all(&f.logs, request(Some(cursor), None, 3000));
        seen.extend(numbers(&text));
        cursor = next;
        f.logs.rotate_all();
    }
    assert_eq!(seen, (10..written).collect::<Vec<_>>());
    // Nothing new: nothing read, the cursor stays.
    let chunk = f.logs.read(&request(Some(cursor), None, 100)).unwrap();
    assert!(chunk.data.is_empty());
    assert_eq!(chunk.next, cursor);
}

#[test]
fn a_cursor_of_another_log_or_a_pruned_file_starts_at_the_oldest_line() {
    let f = fixture(1);
    write_lines(&f.live, 0, 3);
    let stale = LogCursor {
        file_id: 12345 << 32,
        offset: 7,
    };
    let chunk = f.logs.read(&request(Some(stale), None, 1000)).unwrap();
    assert_eq!(numbers(&String::from_utf8(chunk.data).unwrap()), [0, 1, 2]);
    let (_, old) = read_all(&f.logs, request(None, None, 1000));
    // Three rotations later the cursor's generation is gone.
    for i in 0..3 {
        write_lines(&f.live, 3 + i * 2000, 3 + (i + 1) * 2000);
        assert!(f.logs.rotate_all() >= 1);
    }
    let chunk = f.logs.read(&request(Some(old), None, 100)).unwrap();
    let oldest = f.logs.read(&request(None, None, 100)).unwrap();
    assert_eq!(chunk, oldest);
}

#[test]
fn tail_counts_lines_across_files() {
    let f = fixture(2);
    write_lines(&f.live, 0, 2000);
    assert_eq!(f.logs.rotate_all(), 1);
    // A line split by the rotation (whole blocks are cut) counts once.
    for lines in [1u32, 5, 100, 1000] {
        let (text, _) = read_all(&f.logs, request(None, Some(lines), 1000));
        let want: Vec<u64> = (2000 - u64::from(lines)..2000).collect();
        assert_eq!(numbers(&text), want, "tail {lines}");
    }
    let (text, _) = read_all(&f.logs, request(None, Some(100_000), 1000));
    assert_eq!(numbers(&text), (0..2000).collect::<Vec<_>>());
    let chunk = f.logs.read(&request(None, Some(0), 1000)).unwrap();
    assert!(chunk.data.is_empty());
    // A last line without its newline yet is a line.
    append_raw(&f.live, b"partial");
    let chunk = f.logs.read(&request(None, Some(2), 1000)).unwrap();
    assert!(chunk.data.starts_with(b"line 00001999"));
    assert!(chunk.data.ends_with(b"\npartial"));
}

fn append_raw(path: &Path, data: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(data)
        .unwrap();
}

#[test]
fn chunks_are_capped() {
    let f = fixture(2);
    write_lines(&f.live, 0, 10_000);
    let chunk = f.logs.read(&request(None, None, u32::MAX)).unwrap();
    assert_eq!(chunk.data.len(), MAX_CHUNK as usize);
    let chunk = f.logs.read(&request(None, None, 10)).unwrap();
    assert_eq!(chunk.data, b"line 00000");
    assert_eq!(chunk.next.offset, 10);
}

#[test]
fn missing_logs_are_empty_and_bad_names_refused() {
    let f = fixture(2);
    let mut r = request(None, None, 100);
    r.container = "other".into();
    let chunk = f.logs.read(&r).unwrap();
    assert!(chunk.data.is_empty());
    r.pod = "../../etc".into();
    let e = f.logs.read(&r).unwrap_err().to_string();
    assert!(e.starts_with("pod name \"../../etc\":"), "{e}");
    r.pod = "web".into();
    r.container = "main.log.1".into();
    assert!(f.logs.read(&r).is_err());
}

#[test]
fn sizes() {
    assert_eq!(parse_size("10Mi"), Ok(10 << 20));
    assert_eq!(parse_size("64Ki"), Ok(65536));
    assert_eq!(parse_size("1000"), Ok(1000));
    assert_eq!(parse_size("2G"), Ok(2_000_000_000));
    assert!(parse_size("10MB").is_err());
    assert!(parse_size("Mi").is_err());
    assert!(parse_size("99999999999Gi").is_err());
}

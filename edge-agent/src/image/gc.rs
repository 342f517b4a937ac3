//! Garbage collection of the image store: removes unpacked images, the
//! unpacked layers no remaining image lists, blobs (and partial downloads)
//! and reference records that no kept reference needs. Kept are the
//! references of the current desired state and of the previous, different,
//! set (so a rollback needs no download; both lists are kept on disk in
//! `gc-keep`), imported images, and images a container still uses (a lease
//! whose bundle exists), with their layers.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use super::ImageError;
use super::layers;
use super::layout::{self, Digest};
use super::reference::{Reference, Source};
use super::store::ImageStore;

/// Largest keep file read.
const MAX_KEEP_FILE: u64 = 1024 * 1024;
const KEEP_FILE: &str = "gc-keep";
/// Index → manifest → blobs is 2 deep; allow nesting like the layout reader.
const MAX_DEPTH: usize = 6;

/// What a collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Unpacked images removed.
    pub images: usize,
    /// Unpacked layers removed.
    pub layers: usize,
    /// Blobs (and partial downloads) removed.
    pub blobs: usize,
    /// Bytes of blobs removed.
    pub blob_bytes: u64,
    /// False when pulls were running: the collection runs when they end.
    pub ran: bool,
}

impl ImageStore {
    /// Collects garbage keeping `keep` (the current desired references),
    /// the previous set, and imports. Deferred while pulls run.
    pub fn gc(&self, keep: &[String]) -> Result<GcReport, ImageError> {
        let Some(lock) = self.lock(true)? else {
            if let Ok(mut pending) = self.pending_gc.lock() {
                *pending = Some(keep.to_vec());
            }
            tracing::debug!("image garbage collection deferred: pulls are running");
            return Ok(GcReport::default());
        };
        if let Ok(mut pending) = self.pending_gc.lock() {
            *pending = None;
        }
        let result = self.collect(keep);
        drop(lock);
        result
    }

    /// Runs a collection a pull found pending, if no other pull runs.
    pub(crate) fn run_pending_gc(&self) {
        let keep = match self.pending_gc.lock() {
            Ok(mut pending) => pending.take(),
            Err(_) => None,
        };
        if let Some(keep) = keep {
            if let Err(e) = self.gc(&keep) {
                tracing::warn!("image garbage collection: {e}");
            }
        }
    }

    fn collect(&self, keep: &[String]) -> Result<GcReport, ImageError> {
        let store_err = |op, path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Store { op, path, source }
        };
        let root = self.root().to_owned();
        let keep_path = root.join(KEEP_FILE);
        let mut current: Vec<String> = keep.iter().map(|r| canonical(r)).collect();
        current.sort();
        current.dedup();
        let (stored_current, mut previous) = read_keep(&keep_path);
        if stored_current != current {
            previous = stored_current;
            write_keep(&keep_path, &current, &previous)
                .map_err(store_err("writing", &keep_path))?;
        }
        let names: HashSet<&str> = current
            .iter()
            .chain(&previous)
            .map(String::as_str)
            .collect();

        // Every digest a kept reference reaches.
        let mut live: HashSet<String> = HashSet::new();
        let refs_dir = root.join("refs");
        for (path, entry) in self.refs.list().map_err(store_err("reading", &refs_dir))? {
            match entry {
                Some(e) if e.imported || names.contains(e.name.as_str()) => {
                    self.mark(&e.digest, &mut live, 0);
                }
                _ => {
                    if let Err(e) = fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), "removing image record: {e}");
                    }
                }
            }
        }

        let mut report = GcReport {
            ran: true,
            ..GcReport::default()
        };
        // Layers listed by the images that stay.
        let mut kept_layers: HashSet<String> = HashSet::new();
        for entry in fs::read_dir(&root).map_err(store_err("reading", &root))? {
            let entry = entry.map_err(store_err("reading", &root))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_prefix("sha256-")) else {
                continue;
            };
            let path = entry.path();
            if live.contains(hex) || layers::in_use(&path) {
                kept_layers
                    .extend(layers::read_list(&path.join(layers::LIST_FILE)).unwrap_or_default());
                continue;
            }
            tracing::info!(image = %format!("sha256:{hex}"), "removing unused unpacked image");
            fs::remove_dir_all(&path).map_err(store_err("removing", &path))?;
            report.images += 1;
        }
        let layers_dir = root.join(layers::LAYERS_DIR);
        let entries = match fs::read_dir(&layers_dir) {
            Ok(entries) => entries.collect::<Result<Vec<_>, _>>(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        for entry in entries.map_err(store_err("reading", &layers_dir))? {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| kept_layers.contains(n)) {
                continue;
            }
            let path = entry.path();
            tracing::info!(layer = %path.display(), "removing unused unpacked layer");
            fs::remove_dir_all(&path).map_err(store_err("removing", &path))?;
            report.layers += 1;
        }
        let blobs = self.blobs.dir().to_owned();
        for entry in fs::read_dir(&blobs).map_err(store_err("reading", &blobs))? {
            let entry = entry.map_err(store_err("reading", &blobs))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let hex = name.strip_suffix(".partial").unwrap_or(name);
            if live.contains(hex) {
                continue;
            }
            let path = entry.path();
            let len = entry.metadata().map_or(0, |m| m.len());
            fs::remove_file(&path).map_err(store_err("removing", &path))?;
            report.blobs += 1;
            report.blob_bytes += len;
        }
        if report.images > 0 || report.layers > 0 || report.blobs > 0 {
            tracing::info!(
                images = report.images,
                layers = report.layers,
                blobs = report.blobs,
                bytes = report.blob_bytes,
                "image garbage collected"
            );
        }
        Ok(report)
    }

    /// Marks `digest` and, if it is a stored manifest or index, what it names.
    fn mark(&self, digest: &Digest, live: &mut HashSet<String>, depth: usize) {
        if !live.insert(digest.hex().to_owned()) || depth >= MAX_DEPTH {
            return;
        }
        let path = self.blobs.path(digest);
        let mut bytes = Vec::new();
        let read = fs::File::open(&path)
            .and_then(|f| f.take(layout::MAX_JSON + 1).read_to_end(&mut bytes));
        // Layers are not JSON: only small blobs can name others.
        if read.is_err() || bytes.len() as u64 > layout::MAX_JSON || bytes.first() != Some(&b'{') {
            return;
        }
        for (child, _) in layout::children(&bytes) {
            self.mark(&child, live, depth + 1);
        }
    }
}

/// How refs name a reference: registry references in canonical form
/// (`busybox` is `docker.io/library/busybox:latest`), others as written.
pub(crate) fn canonical(reference: &str) -> String {
    match Reference::parse(reference) {
        Ok(Reference {
            source: Source::Registry(name),
            ..
        }) => name.to_string(),
        _ => reference.to_owned(),
    }
}

/// The current and previous keep lists; empty when the file is missing or
/// unreadable.
fn read_keep(path: &Path) -> (Vec<String>, Vec<String>) {
    let mut text = String::new();
    let ok = fs::File::open(path)
        .and_then(|f| f.take(MAX_KEEP_FILE).read_to_string(&mut text))
        .is_ok();
    let (mut current, mut previous) = (Vec::new(), Vec::new());
    if !ok {
        return (current, previous);
    }
    let mut into_previous = false;
    for line in text.lines() {
        match line {
            "[current]" => into_previous = false,
            "[previous]" => into_previous = true,
            "" => {}
            r if into_previous => previous.push(r.to_owned()),
            r => current.push(r.to_owned()),
        }
    }
    (current, previous)
}

fn write_keep(path: &Path, current: &[String], previous: &[String]) -> io::Result<()> {
    let mut text = String::from("[current]\n");
    for r in current {
        text.push_str(r);
        text.push('\n');
    }
    text.push_str("[previous]\n");
    for r in previous {
        text.push_str(r);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

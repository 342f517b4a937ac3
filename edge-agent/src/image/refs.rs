//! Which digest each image reference resolved to on this device, under
//! `{data_dir}/images/refs/`: one small file per reference (named by the
//! sha256 of its canonical form), so a tag is resolved against the registry
//! once and an image starts again with no network. Imported images are
//! marked, and garbage collection keeps them.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::hex;
use super::layout::Digest;

/// Longest ref file read (a reference is at most 4 KiB).
const MAX_REF_FILE: u64 = 8 * 1024;
const IMPORTED: &str = "imported";

/// One reference's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefEntry {
    /// The canonical reference.
    pub name: String,
    /// The manifest or index it names (for local layouts, the platform's
    /// manifest).
    pub digest: Digest,
    /// Loaded by `image import`: kept by garbage collection.
    pub imported: bool,
}

/// The refs directory.
#[derive(Debug, Clone)]
pub(crate) struct Refs {
    dir: PathBuf,
}

impl Refs {
    pub fn open(root: &Path) -> io::Result<Self> {
        let dir = root.join("refs");
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(hex(&Sha256::digest(name.as_bytes())))
    }

    /// The record of `name`, if any (an unreadable one counts as none).
    pub fn get(&self, name: &str) -> Option<RefEntry> {
        read(&self.path(name)).filter(|e| e.name == name)
    }

    /// Records that `name` resolves to `digest`; rewrites only on change.
    pub fn set(&self, name: &str, digest: &Digest, imported: bool) -> io::Result<()> {
        let entry = RefEntry {
            name: name.to_owned(),
            digest: digest.clone(),
            imported,
        };
        if let Some(old) = self.get(name) {
            // An import stays marked as one when a pod pulls the same name.
            if old.digest == entry.digest && (old.imported || !imported) {
                return Ok(());
            }
        }
        let path = self.path(name);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        {
            let mut f = fs::File::create(&tmp)?;
            let mut text = format!("{name}\n{digest}\n");
            if imported {
                text.push_str(IMPORTED);
                text.push('\n');
            }
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)
    }

    /// Every record, with its file.
    pub fn list(&self) -> io::Result<Vec<(PathBuf, Option<RefEntry>)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            out.push((path.clone(), read(&path)));
        }
        Ok(out)
    }
}

fn read(path: &Path) -> Option<RefEntry> {
    let mut text = String::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_REF_FILE)
        .read_to_string(&mut text)
        .ok()?;
    let mut lines = text.lines();
    let name = lines.next()?.to_owned();
    let digest = Digest::parse(lines.next()?).ok()?;
    let imported = lines.next() == Some(IMPORTED);
    Some(RefEntry {
        name,
        digest,
        imported,
    })
}

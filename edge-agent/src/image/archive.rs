//! Extracting `oci-archive` tars (an OCI image layout in one tar file) into a
//! scratch directory, refusing anything but plain files and directories.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::ImageError;
use super::unpack::normalize;

/// Extracts the `oci-archive` tar `archive` into the empty directory `into`.
/// Only plain files and directories are expected in such an archive; anything
/// else, or a name leaving `into`, makes the archive invalid.
pub(crate) fn extract_archive(
    reference: &str,
    archive: &Path,
    into: &Path,
) -> Result<(), ImageError> {
    let io_err = |op, path: &Path, source| ImageError::Io {
        reference: reference.to_owned(),
        op,
        path: path.to_owned(),
        source,
    };
    let invalid = |what: String| ImageError::Invalid {
        reference: reference.to_owned(),
        what,
    };
    let file = match File::open(archive) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let what = format!("no image archive at {}", archive.display());
            return Err(ImageError::NotFound {
                reference: reference.to_owned(),
                what,
            });
        }
        Err(e) => return Err(io_err("opening", archive, e)),
    };
    let corrupt = |e: io::Error| invalid(format!("archive {}: {e}", archive.display()));
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let rel = normalize(&raw).map_err(|why| {
            invalid(format!(
                "archive {}: entry {name:?}: {why}",
                archive.display()
            ))
        })?;
        let path = into.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&path).map_err(|e| io_err("creating", &path, e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous if !rel.as_os_str().is_empty() => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(|e| io_err("creating", parent, e))?;
                }
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| io_err("creating", &path, e))?;
                io::copy(&mut entry, &mut out).map_err(corrupt)?;
            }
            other => {
                return Err(invalid(format!(
                    "archive {}: entry {name:?}: unexpected {other:?} entry, an OCI archive holds only files and directories",
                    archive.display()
                )));
            }
        }
    }
    Ok(())
}

//! The files in which the agent hands compiled kernel programs (the seccomp
//! filter, the cgroup v2 device program) to its runtime helper: written
//! whole or not at all, read back with a cap. Instructions are 8 bytes in
//! both program kinds, in native byte order: a file is read on the machine
//! that wrote it only.

use std::io::Read;
use std::path::Path;

/// Bytes of one instruction.
pub const INSN_BYTES: usize = 8;

/// Why a program file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ProgramFileError {
    /// The file is not a whole number of instructions.
    #[error("{path}: {len} bytes, expected a non-empty multiple of {INSN_BYTES}")]
    BadFile { path: String, len: usize },
    /// The file holds more than the kernel takes.
    #[error("{path}: over {max} bytes")]
    TooLong { path: String, max: usize },
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProgramFileError + '_ {
    move |source| ProgramFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `insns` to `path` through a temporary file renamed over it.
pub fn save(
    path: &Path,
    insns: impl Iterator<Item = [u8; INSN_BYTES]>,
) -> Result<(), ProgramFileError> {
    let bytes: Vec<u8> = insns.flatten().collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &bytes).map_err(io(path))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads what [`save`] wrote: at least one and at most `max_insns`
/// instructions, nothing else.
pub fn load(path: &Path, max_insns: usize) -> Result<Vec<[u8; INSN_BYTES]>, ProgramFileError> {
    let max = max_insns * INSN_BYTES;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io(path))?
        .take(u64::try_from(max + 1).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() > max {
        return Err(ProgramFileError::TooLong {
            path: path.display().to_string(),
            max,
        });
    }
    if bytes.is_empty() || bytes.len() % INSN_BYTES != 0 {
        return Err(ProgramFileError::BadFile {
            path: path.display().to_string(),
            len: bytes.len(),
        });
    }
    Ok(bytes
        .chunks_exact(INSN_BYTES)
        .map(|c| {
            let mut insn = [0; INSN_BYTES];
            insn.copy_from_slice(c);
            insn
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.bpf");
        let insns = [[1, 2, 3, 4, 5, 6, 7, 8], [9; 8]];
        save(&path, insns.iter().copied()).unwrap();
        assert_eq!(load(&path, 2).unwrap(), insns);
        assert!(!dir.path().join("p.tmp").exists());
        let err = load(&path, 1).unwrap_err();
        assert!(err.to_string().ends_with("p.bpf: over 8 bytes"), "{err}");
        std::fs::write(&path, [0; 12]).unwrap();
        assert!(matches!(
            load(&path, 4),
            Err(ProgramFileError::BadFile { len: 12, .. })
        ));
        std::fs::write(&path, []).unwrap();
        assert!(matches!(
            load(&path, 4),
            Err(ProgramFileError::BadFile { len: 0, .. })
        ));
        assert!(matches!(
            load(&dir.path().join("none"), 4),
            Err(ProgramFileError::Io { .. })
        ));
    }
}

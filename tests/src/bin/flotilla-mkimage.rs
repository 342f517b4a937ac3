//! `flotilla-mkimage`: writes example OCI images for the quick start.
//!
//! `flotilla-mkimage busybox OUT_DIR [TAG]` writes a busybox image layout
//! (from the host's `/bin/busybox`, Debian's `busybox-static`) to `OUT_DIR`,
//! tagged `TAG` (default `latest`), ready for `oci:OUT_DIR:TAG`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use flotilla_testkit::oci;

const USAGE: &str = "usage: flotilla-mkimage busybox OUT_DIR [TAG]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out, tag) = match args.as_slice() {
        [kind, out] if kind == "busybox" => (out, "latest"),
        [kind, out, tag] if kind == "busybox" => (out, tag.as_str()),
        [flag] if flag == "-h" || flag == "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("flotilla-mkimage: expected an image kind and an output directory\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(Path::new(out), tag) {
        Ok((dir, digest)) => {
            println!("wrote oci:{}:{tag} (manifest {digest})", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flotilla-mkimage: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(out: &Path, tag: &str) -> anyhow::Result<(PathBuf, String)> {
    let busybox = Path::new(oci::HOST_BUSYBOX);
    if !busybox.is_file() {
        anyhow::bail!(
            "{} not found: install the Debian package busybox-static (apt-get install busybox-static)",
            busybox.display()
        );
    }
    let written = oci::busybox()
        .write_layout(out, tag)
        .with_context(|| format!("writing the image layout to {}", out.display()))?;
    // References name layouts by absolute path: print the one to use.
    let dir = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    Ok((dir, written.manifest))
}

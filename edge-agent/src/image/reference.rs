//! Image references in skopeo's transport syntax: `oci:/dir[:tag]` and
//! `oci-archive:/file.tar[:tag]`.

use std::path::PathBuf;

use super::ImageError;

/// Longest reference accepted; desired state is capped, but this keeps error
/// messages and paths sane.
const MAX_REFERENCE: usize = 4096;
/// Longest tag accepted.
const MAX_TAG: usize = 255;

/// Where an image is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// An OCI image layout directory.
    Layout,
    /// An OCI image layout in a tar file.
    Archive,
}

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    /// The reference as given, for messages.
    pub text: String,
    pub transport: Transport,
    /// Absolute path of the layout directory or archive.
    pub path: PathBuf,
    /// The `org.opencontainers.image.ref.name` to pick, if any.
    pub tag: Option<String>,
}

impl Reference {
    /// Parses `text`. Like skopeo, the path ends at the first `:` after the
    /// transport, so paths cannot contain `:` but tags can.
    pub fn parse(text: &str) -> Result<Self, ImageError> {
        let bad = |reason: String| ImageError::BadReference {
            reference: shorten(text),
            reason,
        };
        if text.len() > MAX_REFERENCE {
            return Err(bad(format!(
                "{} bytes long, at most {MAX_REFERENCE} allowed",
                text.len()
            )));
        }
        if text.chars().any(char::is_control) {
            return Err(bad("contains control characters".to_owned()));
        }
        let (transport, rest) = if let Some(rest) = text.strip_prefix("oci:") {
            (Transport::Layout, rest)
        } else if let Some(rest) = text.strip_prefix("oci-archive:") {
            (Transport::Archive, rest)
        } else {
            return Err(bad(
                "unsupported transport: expected oci:/path/to/layout[:tag] or \
                 oci-archive:/path/to/file.tar[:tag] (registry pulls are not supported yet)"
                    .to_owned(),
            ));
        };
        let (path, tag) = match rest.split_once(':') {
            Some((path, tag)) => (path, Some(tag)),
            None => (rest, None),
        };
        if !path.starts_with('/') {
            return Err(bad(format!("path {path:?} is not absolute")));
        }
        if let Some(tag) = tag {
            if tag.is_empty() {
                return Err(bad("empty tag after ':'".to_owned()));
            }
            if tag.len() > MAX_TAG {
                return Err(bad(format!(
                    "tag is {} bytes long, at most {MAX_TAG} allowed",
                    tag.len()
                )));
            }
            if let Some(c) = tag
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || "-._:@+/".contains(*c)))
            {
                return Err(bad(format!(
                    "tag {tag:?} contains {c:?}: expected letters, digits and -._:@+/"
                )));
            }
        }
        Ok(Self {
            text: text.to_owned(),
            transport,
            path: PathBuf::from(path),
            tag: tag.map(str::to_owned),
        })
    }
}

/// The reference for an error message, cut if absurdly long.
fn shorten(text: &str) -> String {
    if text.len() <= 256 {
        return text.to_owned();
    }
    let mut end = 256;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_transports_paths_and_tags() -> Result<(), ImageError> {
        let r = Reference::parse("oci:/srv/img:2")?;
        assert_eq!(
            (r.transport, r.path, r.tag),
            (Transport::Layout, "/srv/img".into(), Some("2".to_owned()))
        );
        let r = Reference::parse("oci:/srv/img")?;
        assert_eq!((r.path, r.tag), ("/srv/img".into(), None));
        let r = Reference::parse("oci-archive:/srv/img.tar:v1.2:extra")?;
        assert_eq!(
            (r.transport, r.path, r.tag),
            (
                Transport::Archive,
                "/srv/img.tar".into(),
                Some("v1.2:extra".to_owned())
            )
        );
        Ok(())
    }

    #[test]
    fn refuses_bad_references_naming_the_problem() {
        let long = format!("oci:/{}", "a".repeat(5000));
        for (text, expect) in [
            ("nginx:latest", "unsupported transport"),
            ("docker://nginx", "unsupported transport"),
            ("oci:relative/dir", "is not absolute"),
            ("oci:", "is not absolute"),
            ("oci:/srv/img:", "empty tag"),
            ("oci:/srv/img:a b", "contains ' '"),
            ("oci:/srv/\nimg", "control characters"),
            (long.as_str(), "at most 4096"),
        ] {
            match Reference::parse(text) {
                Err(e @ ImageError::BadReference { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(expect), "{text:?}: {msg}");
                    assert!(msg.len() < 600, "{text:?}: message too long");
                    assert_eq!(e.reason(), "InvalidImageName");
                }
                other => panic!("{text:?}: expected BadReference, got {other:?}"),
            }
        }
    }
}

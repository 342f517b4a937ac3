//! Image references: skopeo's local transports `oci:/dir[:tag]` and
//! `oci-archive:/file.tar[:tag]`, and ordinary registry references
//! (`busybox`, `docker.io/library/busybox:1.36`,
//! `registry.local:5000/app@sha256:…`), optionally prefixed `docker://`.

use std::fmt;
use std::path::PathBuf;

use super::ImageError;
use super::layout::Digest;

/// Longest reference accepted; desired state is capped, but this keeps error
/// messages and paths sane.
const MAX_REFERENCE: usize = 4096;
/// Longest tag accepted (layouts); registry tags follow the distribution
/// spec's 128.
const MAX_TAG: usize = 255;
/// Longest registry tag, as the distribution spec allows.
const MAX_REGISTRY_TAG: usize = 128;
/// Longest repository name with its registry, as the distribution spec allows.
const MAX_NAME: usize = 255;
/// The registry a name without one means, as Docker has it.
pub(crate) const DOCKER_HUB: &str = "docker.io";

/// Where an image is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// An OCI image layout directory.
    Layout {
        /// Absolute path of the directory.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick, if any.
        tag: Option<String>,
    },
    /// An OCI image layout in a tar file.
    Archive {
        /// Absolute path of the tar file.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick, if any.
        tag: Option<String>,
    },
    /// A registry, over the OCI distribution API.
    Registry(ImageName),
}

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    /// The reference as given, for messages.
    pub text: String,
    pub source: Source,
}

/// An image in a registry, normalised as Docker does: `busybox` is
/// `docker.io/library/busybox:latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageName {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub registry: String,
    /// `library/busybox`.
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest is given.
    pub tag: Option<String>,
    /// The manifest (or index) digest; when present it decides, not the tag.
    pub digest: Option<Digest>,
}

impl ImageName {
    /// Parses a registry reference (without transport prefix).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (rest, Some(Digest::parse(digest)?)),
            None => (text, None),
        };
        // A `:` after the last `/` starts the tag; one before it is a port.
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[slash..].find(':') {
            Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
            None => (rest, None),
        };
        if name.is_empty() {
            return Err("empty repository name".to_owned());
        }
        if name.len() > MAX_NAME {
            return Err(format!(
                "name is {} bytes long, at most {MAX_NAME} allowed",
                name.len()
            ));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first, path)
            }
            _ => (DOCKER_HUB, name),
        };
        check_host(registry)?;
        for component in path.split('/') {
            check_component(component)?;
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        if let Some(tag) = tag {
            check_tag(tag)?;
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Self {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// What the registry is asked for: the digest if there is one, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }
}

impl fmt::Display for ImageName {
    /// The canonical form, `docker.io/library/busybox:1.36[@sha256:…]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn check_host(host: &str) -> Result<(), String> {
    let bad =
        || format!("registry {host:?}: expected a host name or address, with an optional :port");
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or_else(bad)?;
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(bad());
        }
        match after {
            "" => (None, None),
            p => (None, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(name) = name {
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
        if !ok {
            return Err(bad());
        }
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!(
                "registry {host:?}: port {port:?} is not a number from 1 to 65535"
            ));
        }
    }
    Ok(())
}

/// A path component: lowercase letters and digits, separated by `.`, `_`,
/// `__` or dashes, as the distribution spec has it.
fn check_component(c: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "repository component {c:?}: expected lowercase letters and digits, \
             separated by '.', '_', '__' or '-'"
        )
    };
    let b = c.as_bytes();
    let (Some(first), Some(last)) = (b.first(), b.last()) else {
        return Err(bad());
    };
    if !(first.is_ascii_lowercase() || first.is_ascii_digit())
        || !(last.is_ascii_lowercase() || last.is_ascii_digit())
    {
        return Err(bad());
    }
    let mut prev_sep: Option<u8> = None;
    for (i, &ch) in b.iter().enumerate() {
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            prev_sep = None;
            continue;
        }
        let ok = match (ch, prev_sep) {
            (b'-', None | Some(b'-')) => true,
            (b'.', None) => true,
            (b'_', None) => true,
            (b'_', Some(b'_')) => i >= 2 && b[i - 2] != b'_',
            _ => false,
        };
        if !ok {
            return Err(bad());
        }
        prev_sep = Some(ch);
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_REGISTRY_TAG
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?}: expected 1 to {MAX_REGISTRY_TAG} letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        ))
    }
}

impl Reference {
    /// Parses `text`. Like skopeo, a local path ends at the first `:` after
    /// the transport, so paths cannot contain `:` but tags can. Anything
    /// without `oci:` or `oci-archive:` is a registry reference.
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
        let (archive, rest) = if let Some(rest) = text.strip_prefix("oci:") {
            (false, rest)
        } else if let Some(rest) = text.strip_prefix("oci-archive:") {
            (true, rest)
        } else {
            let name = text.strip_prefix("docker://").unwrap_or(text);
            let name = ImageName::parse(name).map_err(|e| {
                bad(format!(
                    "{e} (expected a registry reference like registry.local:5000/app:2, \
                     or oci:/path/to/layout[:tag], or oci-archive:/path/to/file.tar[:tag])"
                ))
            })?;
            return Ok(Self {
                text: text.to_owned(),
                source: Source::Registry(name),
            });
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
        let path = PathBuf::from(path);
        let tag = tag.map(str::to_owned);
        let source = if archive {
            Source::Archive { path, tag }
        } else {
            Source::Layout { path, tag }
        };
        Ok(Self {
            text: text.to_owned(),
            source,
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

    fn local(r: &Reference) -> (bool, PathBuf, Option<String>) {
        match &r.source {
            Source::Layout { path, tag } => (false, path.clone(), tag.clone()),
            Source::Archive { path, tag } => (true, path.clone(), tag.clone()),
            Source::Registry(n) => panic!("{n} is not local"),
        }
    }

    #[test]
    fn parses_transports_paths_and_tags() -> Result<(), ImageError> {
        let r = Reference::parse("oci:/srv/img:2")?;
        assert_eq!(local(&r), (false, "/srv/img".into(), Some("2".to_owned())));
        let r = Reference::parse("oci:/srv/img")?;
        assert_eq!(local(&r), (false, "/srv/img".into(), None));
        let r = Reference::parse("oci-archive:/srv/img.tar:v1.2:extra")?;
        assert_eq!(
            local(&r),
            (true, "/srv/img.tar".into(), Some("v1.2:extra".to_owned()))
        );
        Ok(())
    }

    #[test]
    fn parses_registry_references_as_docker_does() {
        let hex = "ab".repeat(32);
        for (text, canonical) in [
            ("busybox", "docker.io/library/busybox:latest".to_owned()),
            (
                "docker://busybox:1.36",
                "docker.io/library/busybox:1.36".to_owned(),
            ),
            (
                "docker.io/library/busybox:1.36",
                "docker.io/library/busybox:1.36".to_owned(),
            ),
            ("org/app", "docker.io/org/app:latest".to_owned()),
            (
                "registry.local:5000/app:2",
                "registry.local:5000/app:2".to_owned(),
            ),
            (
                "localhost/a/b__c/d-e.f",
                "localhost/a/b__c/d-e.f:latest".to_owned(),
            ),
            ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest".to_owned()),
            (
                &format!("ghcr.io/org/app@sha256:{hex}"),
                format!("ghcr.io/org/app@sha256:{hex}"),
            ),
            (
                &format!("ghcr.io/org/app:v1@sha256:{hex}"),
                format!("ghcr.io/org/app:v1@sha256:{hex}"),
            ),
        ] {
            match Reference::parse(text).map(|r| r.source) {
                Ok(Source::Registry(name)) => assert_eq!(name.to_string(), canonical, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let name = ImageName::parse(&format!("r.io/app:v1@sha256:{hex}")).unwrap();
        assert_eq!(name.manifest_ref(), format!("sha256:{hex}"));
        assert_eq!(
            ImageName::parse("r.io/app:v1").unwrap().manifest_ref(),
            "v1"
        );
    }

    #[test]
    fn refuses_bad_references_naming_the_problem() {
        let long = format!("oci:/{}", "a".repeat(5000));
        for (text, expect) in [
            ("Nginx:latest", "repository component \"Nginx\""),
            ("nginx:", "tag \"\""),
            ("nginx:-x", "tag \"-x\""),
            ("r.io/app@sha256:abc", "digest \"sha256:abc\""),
            ("r.io/app@md5:abc", "only sha256"),
            ("r.io//app", "repository component \"\""),
            ("r.io:0/app", "port \"0\""),
            ("r.io/a--_b", "repository component"),
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

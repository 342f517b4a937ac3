//! How a container spec and its image become the process the runtime starts:
//! argv by Kubernetes' rules, environment, working directory, user, paths,
//! and the container's id.

use std::path::{Path, PathBuf};

use flotilla_proto::{ContainerSpec, EnvVar, PodSpec, Volume};
use sha2::{Digest, Sha256};

use crate::image::{Image, ImageConfig, resolve_user};
use crate::runtime::{ContainerConfig, Mount};

/// Why a container could not be started, as reported in its `Waiting` state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StartFailure {
    /// CamelCase reason (`ImageNotFound`, `CreateFailed`, `StartFailed`, …).
    pub reason: &'static str,
    /// A sentence for people.
    pub message: String,
}

impl StartFailure {
    pub(crate) fn create(message: String) -> Self {
        Self {
            reason: "CreateFailed",
            message,
        }
    }
}

/// The runtime id of a container: `{pod}.{container}.{hash}`, the hash being
/// the first 8 hex digits of a SHA-256 over the spec's [stable
/// encoding](stable_encoding). A changed spec gets a new id, and a restarted
/// agent recognises its containers by id alone.
///
/// This is the id of a container that mounts no volume; the reconciler uses
/// [`container_id_with_volumes`], which gives the same id for such a one.
pub fn container_id(pod: &str, spec: &ContainerSpec) -> String {
    container_id_with_volumes(pod, spec, &[])
}

/// [`container_id`], the hash also covering the definition of each volume
/// of `volumes` the container mounts, in mount order: a changed volume (a
/// config file edited, a host path moved) replaces exactly the containers
/// that see it.
pub fn container_id_with_volumes(pod: &str, spec: &ContainerSpec, volumes: &[Volume]) -> String {
    let mut h = Sha256::new();
    hash_part(&mut h, &stable_encoding(spec));
    for m in &spec.volume_mounts {
        if let Some(v) = volumes.iter().find(|v| v.name == m.name) {
            hash_part(&mut h, &stable_encoding(&*super::volumes::for_id(v)));
        }
    }
    let digest = h.finalize();
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{pod}.{}.{hex}", spec.name)
}

/// A pod spec's SHA-256, which the reconciler keeps instead of the spec
/// (its pod task holds that) to see whether a new desired state changes it.
pub(super) fn spec_digest(spec: &PodSpec) -> [u8; 32] {
    Sha256::digest(stable_encoding(spec)).into()
}

/// Feeds one part, length first, so parts cannot run into each other.
fn hash_part(h: &mut Sha256, part: &[u8]) {
    h.update((part.len() as u64).to_le_bytes());
    h.update(part);
}

/// The postcard encoding of `value` without its trailing zero bytes.
///
/// Why: an agent upgraded to a protocol whose `ContainerSpec` (or `Volume`)
/// gained fields must not replace every running container. New fields are
/// only ever appended, and their defaults (`None`, empty, `false`, 0) encode
/// as zero bytes, so cutting trailing zeros gives an old spec the same hash
/// under the new protocol. Within one protocol version the cut loses
/// nothing: postcard encodings of one type are prefix-free, so two
/// encodings that differ only in trailing zeros cannot both exist.
fn stable_encoding<T: serde::Serialize + std::fmt::Debug>(value: &T) -> Vec<u8> {
    // Serializing a plain struct into a Vec cannot fail; the fallback still
    // gives a stable id.
    let mut bytes =
        postcard::to_allocvec(value).unwrap_or_else(|_| format!("{value:?}").into_bytes());
    let kept = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes.truncate(kept);
    bytes
}

/// Splits a runtime id made by [`container_id`] into pod and container
/// names; `None` for ids that are not ours.
pub fn parse_id(id: &str) -> Option<(&str, &str)> {
    let mut parts = id.split('.');
    let (pod, container, hash) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = hash.len() == 8
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let ok = parts.next().is_none()
        && hex
        && flotilla_proto::check_name(pod).is_ok()
        && flotilla_proto::check_name(container).is_ok();
    ok.then_some((pod, container))
}

/// Where a container's output goes: `{data_dir}/logs/{pod}/{container}.log`.
pub(crate) fn log_path(data_dir: &Path, pod: &str, container: &str) -> PathBuf {
    pod_log_dir(data_dir, pod).join(format!("{container}.log"))
}

/// The directory of a pod's logs.
pub(crate) fn pod_log_dir(data_dir: &Path, pod: &str) -> PathBuf {
    data_dir.join("logs").join(pod)
}

/// Everything the runtime needs for `spec`, run from `image` in pod `pod`
/// with its volumes at `mounts`. Blocking (reads the image's passwd and
/// group files).
pub(crate) fn container_config(
    pod: &str,
    id: &str,
    spec: &ContainerSpec,
    image: &Image,
    log_path: PathBuf,
    mounts: Vec<Mount>,
) -> Result<ContainerConfig, StartFailure> {
    let args = argv(&spec.command, &spec.args, &image.config).map_err(StartFailure::create)?;
    let env = environment(&image.config.env, &spec.env).map_err(StartFailure::create)?;
    let cwd =
        working_dir(spec.working_dir.as_deref(), &image.config).map_err(StartFailure::create)?;
    let (uid, gid) = resolve_user(&image.rootfs, &image.config.user).map_err(|e| StartFailure {
        reason: e.reason(),
        message: e.to_string(),
    })?;
    Ok(ContainerConfig {
        id: id.to_owned(),
        image_rootfs: image.rootfs.clone(),
        args,
        env,
        cwd,
        uid,
        gid,
        hostname: pod.to_owned(),
        resources: spec.resources,
        log_path,
        mounts,
        security: spec.security_context.clone().unwrap_or_default(),
    })
}

/// The process's argv by Kubernetes' rules: `command` replaces the image's
/// entrypoint and `args` its cmd; a `command` without `args` runs alone.
pub(crate) fn argv(
    command: &[String],
    args: &[String],
    image: &ImageConfig,
) -> Result<Vec<String>, String> {
    let argv: Vec<String> = match (command.is_empty(), args.is_empty()) {
        (false, _) => command.iter().chain(args).cloned().collect(),
        (true, false) => image.entrypoint.iter().chain(args).cloned().collect(),
        (true, true) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    };
    if argv.is_empty() {
        return Err(
            "no command: the container sets no command or args and the image has no entrypoint or cmd"
                .to_owned(),
        );
    }
    if argv[0].is_empty() {
        return Err("command: the program name is empty".to_owned());
    }
    if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
        return Err(format!("argv[{i}]: contains a NUL byte"));
    }
    Ok(argv)
}

/// The image's environment with the spec's variables added or overriding.
pub(crate) fn environment(image: &[String], spec: &[EnvVar]) -> Result<Vec<String>, String> {
    for v in spec {
        if v.name.is_empty() || v.name.contains(['=', '\0']) {
            return Err(format!(
                "env {:?}: a variable name must be non-empty, without '=' or NUL",
                v.name
            ));
        }
        if v.value.contains('\0') {
            return Err(format!("env {}: the value contains a NUL byte", v.name));
        }
    }
    let overridden = |entry: &String| {
        let name = entry.split_once('=').map_or(entry.as_str(), |(n, _)| n);
        spec.iter().any(|v| v.name == name)
    };
    let mut env: Vec<String> = image.iter().filter(|e| !overridden(e)).cloned().collect();
    for (i, v) in spec.iter().enumerate() {
        // A name repeated in the spec: the last one wins, as in a shell.
        if spec[i + 1..].iter().all(|later| later.name != v.name) {
            env.push(format!("{}={}", v.name, v.value));
        }
    }
    Ok(env)
}

/// The spec's working directory, else the image's, else `/`.
pub(crate) fn working_dir(spec: Option<&str>, image: &ImageConfig) -> Result<String, String> {
    let dir = spec
        .filter(|d| !d.is_empty())
        .or(Some(image.working_dir.as_str()).filter(|d| !d.is_empty()))
        .unwrap_or("/");
    if !dir.starts_with('/') || dir.contains('\0') {
        return Err(format!(
            "working directory {dir:?}: expected an absolute path"
        ));
    }
    Ok(dir.to_owned())
}

#[cfg(test)]
mod tests {
    use flotilla_proto::Resources;

    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: s(entrypoint),
            cmd: s(cmd),
            env: s(&["PATH=/bin", "A=image"]),
            working_dir: String::new(),
            user: String::new(),
        }
    }

    #[test]
    fn argv_rules() {
        let img = image(&["/entry"], &["--cmd"]);
        let check = |command: &[&str], args: &[&str]| argv(&s(command), &s(args), &img);
        assert_eq!(check(&[], &[]), Ok(s(&["/entry", "--cmd"])));
        assert_eq!(check(&["/bin/sh"], &[]), Ok(s(&["/bin/sh"])));
        assert_eq!(
            check(&["/bin/sh"], &["-c", "x"]),
            Ok(s(&["/bin/sh", "-c", "x"]))
        );
        assert_eq!(check(&[], &["--other"]), Ok(s(&["/entry", "--other"])));
        let empty = image(&[], &[]);
        assert!(
            argv(&[], &[], &empty)
                .unwrap_err()
                .starts_with("no command")
        );
        assert_eq!(argv(&[], &s(&["x"]), &empty), Ok(s(&["x"])));
        assert!(argv(&s(&["a\0b"]), &[], &empty).is_err());
    }

    #[test]
    fn env_overrides() {
        let var = |n: &str, v: &str| EnvVar {
            name: n.into(),
            value: v.into(),
        };
        let img = s(&["PATH=/bin", "A=image", "B=keep"]);
        assert_eq!(
            environment(&img, &[var("A", "1"), var("C", "2"), var("C", "3")]),
            Ok(s(&["PATH=/bin", "B=keep", "A=1", "C=3"]))
        );
        assert!(environment(&img, &[var("A=B", "1")]).is_err());
        assert!(environment(&img, &[var("", "1")]).is_err());
    }

    #[test]
    fn working_dirs() {
        let mut img = image(&[], &[]);
        assert_eq!(working_dir(None, &img), Ok("/".into()));
        img.working_dir = "/srv".into();
        assert_eq!(working_dir(None, &img), Ok("/srv".into()));
        assert_eq!(working_dir(Some("/app"), &img), Ok("/app".into()));
        assert!(working_dir(Some("app"), &img).is_err());
    }

    #[test]
    fn ids_are_stable_and_follow_the_spec() {
        let spec = ContainerSpec {
            name: "web".into(),
            image: "oci:/img".into(),
            command: s(&["/bin/sh"]),
            args: vec![],
            env: vec![],
            working_dir: None,
            resources: Resources::default(),
            volume_mounts: vec![],
            liveness_probe: None,
            readiness_probe: None,
            startup_probe: None,
            security_context: None,
        };
        let id = container_id("shop", &spec);
        assert_eq!(id, container_id("shop", &spec.clone()));
        assert_eq!(parse_id(&id), Some(("shop", "web")));
        assert_eq!(id.len(), "shop.web.".len() + 8);
        let mut changed = spec.clone();
        changed.args = s(&["-c", "true"]);
        assert_ne!(container_id("shop", &changed), id);
        // The hash covers the spec's own encoding, trailing zeros cut.
        let bytes = stable_encoding(&spec);
        assert_eq!(bytes[0], 3, "the name's length comes first");
        assert_eq!(&bytes[1..4], b"web");
        assert_ne!(bytes.last(), Some(&0));

        // A later protocol that appends fields to ContainerSpec (a tuple
        // encodes as its parts one after the other) hashes an old spec with
        // the new fields at their defaults to the same id, and a set new
        // field to another one.
        let grown = (spec.clone(), None::<String>, Vec::<u32>::new(), false, 0u8);
        assert_eq!(stable_encoding(&grown), bytes);
        let set = (spec.clone(), None::<String>, Vec::<u32>::new(), true, 0u8);
        assert_ne!(stable_encoding(&set), bytes);

        // Pinned (and checked by hashing the hand-written bytes
        // `03 web 08 oci:/img 01 07 /bin/sh`, length first): a different hash
        // for the same spec would make an upgraded agent replace every
        // running container.
        assert_eq!(id, "shop.web.6a59388e");

        // Volumes count only when mounted, and then by their definition.
        use flotilla_proto::{VolumeMount, VolumeSource};
        let conf = |text: &str| Volume {
            name: "conf".into(),
            source: VolumeSource::Config {
                files: vec![flotilla_proto::ConfigFile {
                    path: "a".into(),
                    data: text.as_bytes().to_vec(),
                    mode: 0o644,
                }],
            },
        };
        assert_eq!(container_id_with_volumes("shop", &spec, &[conf("v1")]), id);
        let mut mounting = spec.clone();
        mounting.volume_mounts.push(VolumeMount {
            name: "conf".into(),
            mount_path: "/etc/app".into(),
            read_only: true,
        });
        let v1 = container_id_with_volumes("shop", &mounting, &[conf("v1")]);
        let v2 = container_id_with_volumes("shop", &mounting, &[conf("v2")]);
        assert_ne!(v1, v2);
        assert_ne!(v1, container_id("shop", &mounting));
        assert_eq!(parse_id(&v2), Some(("shop", "web")));

        for not_ours in [
            "shop.web",
            "shop.web.123",
            "shop.web.1234567g",
            "a.b.c.d",
            "Shop.web.12345678",
        ] {
            assert_eq!(parse_id(not_ours), None, "{not_ours}");
        }
    }
}

//! A real registry for tests: Debian's `docker-registry` on a free loopback
//! port, in a temp dir, optionally with TLS (a CA and server certificate made
//! with `openssl`), basic authentication (`htpasswd`) or bearer tokens (the
//! registry's `silly` auth with [`TokenServer`] as the realm). Images are
//! pushed from OCI layouts with `skopeo copy --preserve-digests`, so what
//! the registry serves is byte for byte what the test wrote. [`CutProxy`]
//! is a TCP proxy that drops a connection after a number of bytes, or
//! throttles what it sends back.
//!
//! Everything listens on 127.0.0.1 only, and stops when dropped.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How a [`Registry`] is set up.
#[derive(Debug, Clone, Default)]
pub struct RegistryBuilder {
    tls: bool,
    basic: Option<(String, String)>,
    token_realm: Option<String>,
}

impl RegistryBuilder {
    /// Serve HTTPS with a certificate for 127.0.0.1 signed by a fresh CA.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Require this user and password (basic authentication).
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.basic = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Answer unauthenticated requests with a bearer challenge naming
    /// `realm` (a [`TokenServer`] URL); any bearer token is then accepted.
    pub fn token_auth(mut self, realm: &str) -> Self {
        self.token_realm = Some(realm.to_owned());
        self
    }

    /// Starts the registry and waits until it accepts connections.
    pub fn start(self) -> Result<Registry> {
        let dir = tempfile::tempdir().context("creating the registry's temp dir")?;
        let root = dir.path().join("storage");
        fs::create_dir(&root)?;
        let port = free_port()?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            root.display()
        );
        let mut ca = None;
        if self.tls {
            let (ca_pem, cert, key) = make_certs(dir.path())?;
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            ca = Some(ca_pem);
        }
        if let Some((user, password)) = &self.basic {
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .context("running htpasswd (Debian package apache2-utils)")?;
            if !out.status.success() {
                bail!("htpasswd: {}", String::from_utf8_lossy(&out.stderr));
            }
            fs::write(&htpasswd, &out.stdout)?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n",
                htpasswd.display()
            ));
        } else if let Some(realm) = &self.token_realm {
            config.push_str(&format!(
                "auth:\n  silly:\n    realm: {realm}\n    service: flotilla-test\n"
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config)?;
        let log = fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        let registry = Registry {
            child,
            dir,
            port,
            ca,
            creds: self.basic,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log = fs::read_to_string(registry.dir.path().join("registry.log"))
                    .unwrap_or_default();
                bail!("docker-registry did not listen on 127.0.0.1:{port} within 15 s: {log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(registry)
    }
}

/// A running `docker-registry`.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    ca: Option<PathBuf>,
    creds: Option<(String, String)>,
}

impl Registry {
    /// A builder for a registry with TLS or authentication.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// A plain-HTTP registry with no authentication.
    pub fn start() -> Result<Self> {
        RegistryBuilder::default().start()
    }

    /// `127.0.0.1:PORT`, as image references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The CA certificate (PEM) of a TLS registry.
    pub fn ca_pem(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// Pushes the image tagged `tag` in the OCI layout `layout` as
    /// `{host}/{dest}` (`repo:tag`), every platform of an index, digests kept.
    pub fn push(&self, layout: &Path, tag: &str, dest: &str) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--all", "--preserve-digests"]);
        match &self.ca {
            Some(ca) => {
                let certs = self.dir.path().join("skopeo-certs");
                fs::create_dir_all(&certs)?;
                fs::copy(ca, certs.join("ca.crt"))?;
                cmd.arg("--dest-cert-dir").arg(&certs);
            }
            None => {
                cmd.arg("--dest-tls-verify=false");
            }
        }
        if let Some((user, password)) = &self.creds {
            cmd.arg("--dest-creds").arg(format!("{user}:{password}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{dest}", self.host()));
        let out = cmd
            .output()
            .context("running skopeo (Debian package skopeo)")?;
        if !out.status.success() {
            bail!(
                "skopeo copy to {dest}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Where the registry keeps blob `digest` (`sha256:…`) on disk, to
    /// corrupt it.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (free when this returns).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made with
/// `openssl`. Returns (CA PEM, server certificate, server key).
fn make_certs(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let p = |name: &str| dir.join(name);
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    fs::write(
        p("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )?;
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=flotilla test CA",
    ])?;
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])?;
    Ok((p("ca.pem"), p("server.pem"), p("server.key")))
}

/// A token server for bearer authentication: answers `GET` with
/// `{"token": …}` when the request carries this user and password (basic),
/// 401 otherwise.
#[derive(Debug)]
pub struct TokenServer {
    port: u16,
    stop: Arc<AtomicBool>,
    granted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TokenServer {
    /// Starts the server on a free loopback port.
    pub fn start(user: &str, password: &str) -> Result<Self> {
        use base64_lite as b64;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let expected = b64::encode(format!("{user}:{password}").as_bytes());
        let stop = Arc::new(AtomicBool::new(false));
        let (granted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let thread = {
            let (stop, granted, refused) = (stop.clone(), granted.clone(), refused.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let head = read_head(&mut conn);
                    let ok = head.lines().any(|l| {
                        l.split_once(':').is_some_and(|(name, value)| {
                            let value = value.trim();
                            name.trim().eq_ignore_ascii_case("authorization")
                                && value.len() > 6
                                && value[..6].eq_ignore_ascii_case("basic ")
                                && value[6..] == expected
                        })
                    });
                    let response = if ok {
                        granted.fetch_add(1, Ordering::Relaxed);
                        let body = r#"{"token":"flotilla-test-token"}"#;
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        refused.fetch_add(1, Ordering::Relaxed);
                        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_owned()
                    };
                    let _ = conn.write_all(response.as_bytes());
                }
            })
        };
        Ok(Self {
            port,
            stop,
            granted,
            refused,
            thread: Some(thread),
        })
    }

    /// The realm URL.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Tokens handed out.
    pub fn granted(&self) -> usize {
        self.granted.load(Ordering::Relaxed)
    }

    /// Requests refused.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads an HTTP request head (up to the blank line, at most 64 KiB).
fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while head.len() < 64 * 1024 && !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A TCP proxy on a free loopback port to `upstream` that drops the
/// connection carrying byte number `cut_after` (counted over everything sent
/// back to clients), once; later connections pass untouched. It records the
/// request heads it forwards and the bytes it sent back, and sends at most
/// [`CutProxy::set_rate`] bytes a second when one is set.
#[derive(Debug)]
pub struct CutProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl CutProxy {
    /// Starts the proxy.
    pub fn start(upstream: SocketAddr, cut_after: u64) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let cut_done = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, sent, requests, rate) =
                (stop.clone(), sent.clone(), requests.clone(), rate.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                        (Ok(c), Ok(s)) => (c, s),
                        _ => continue,
                    };
                    let reqs = requests.clone();
                    // Client → server, noting request heads.
                    thread::spawn(move || {
                        let (mut from, mut to) = (c2, s2);
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            let text = String::from_utf8_lossy(&buf[..n]);
                            if text.starts_with("GET ") || text.starts_with("HEAD ") {
                                if let Ok(mut r) = reqs.lock() {
                                    r.push(text.into_owned());
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                    let (sent, cut_done, rate) = (sent.clone(), cut_done.clone(), rate.clone());
                    // Server → client, counting and maybe cutting or throttling.
                    thread::spawn(move || {
                        let (mut from, mut to) = (server, client);
                        let mut buf = vec![0u8; 8 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            let limit = rate.load(Ordering::Relaxed);
                            if limit > 0 && n > 0 {
                                thread::sleep(Duration::from_secs_f64(n as f64 / limit as f64));
                            }
                            if n == 0 {
                                break;
                            }
                            let before = sent.load(Ordering::Relaxed);
                            let mut n = n as u64;
                            let cut = !cut_done.load(Ordering::Relaxed) && before + n > cut_after;
                            if cut {
                                n = cut_after.saturating_sub(before);
                            }
                            let len = usize::try_from(n).unwrap_or(0);
                            if to.write_all(&buf[..len]).is_err() {
                                break;
                            }
                            sent.fetch_add(n, Ordering::Relaxed);
                            if cut {
                                cut_done.store(true, Ordering::Relaxed);
                                let _ = to.shutdown(Shutdown::Both);
                                let _ = from.shutdown(Shutdown::Both);
                                return;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            })
        };
        Ok(Self {
            port,
            stop,
            sent,
            rate,
            requests,
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A proxy that never cuts, sending at most `bytes_per_sec` back.
    pub fn throttled(upstream: SocketAddr, bytes_per_sec: u64) -> Result<Self> {
        let proxy = Self::start(upstream, u64::MAX)?;
        proxy.set_rate(bytes_per_sec);
        Ok(proxy)
    }

    /// Sends at most `bytes_per_sec` back to clients from now on; 0 lifts
    /// the limit.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Bytes sent back to clients so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The request heads forwarded so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Just enough base64 for a basic-auth header.
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &[u8]) -> String {
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

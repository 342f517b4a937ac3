#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The API's tokens, roles and TLS, against a real `flotilla serve`: a
//! viewer's write is refused and nothing is stored, an operator's goes
//! through, missing, unknown, expired and revoked tokens get 401, only the
//! admin manages tokens; HTTPS works with the fleet CA and not without it;
//! and the CLI does the same end to end.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Serve {
    child: Child,
    dir: PathBuf,
    api: String,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn start(dir: &Path) -> Serve {
        let api_port = free_port();
        let data = dir.join("controller");
        let log = dir.join("serve.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--mqtt-listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("FLOTILLA_LOG", "info,rmqtt=warn,rmqtt_net=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            dir: data,
            api: format!("https://127.0.0.1:{api_port}"),
            log,
        };
        let deadline = Instant::now() + T;
        loop {
            if serve.dir.join("ca.pem").exists()
                && serve.dir.join("admin.token").exists()
                && serve.call("GET", "/healthz", None, None).0 == 200
            {
                return serve;
            }
            assert!(
                Instant::now() < deadline,
                "the API did not answer: {}",
                std::fs::read_to_string(&serve.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn admin(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn ca_der(&self) -> Vec<u8> {
        let pem = std::fs::read_to_string(self.dir.join("ca.pem")).unwrap();
        flotilla_controller::identity::ca::pem_der(&pem).unwrap()
    }

    /// An HTTP agent trusting `roots` only.
    fn agent(roots: Vec<Vec<u8>>) -> ureq::Agent {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let roots: Vec<Certificate<'static>> = roots
            .iter()
            .map(|d| Certificate::from_der(d).to_owned())
            .collect();
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::from(roots))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into()
    }

    /// `(status, body)`, or `(0, …)` when no connection could be made
    /// (the server is still starting).
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let Ok(pem) = std::fs::read_to_string(self.dir.join("ca.pem")) else {
            return (0, Value::Null);
        };
        let Some(der) = flotilla_controller::identity::ca::pem_der(&pem) else {
            return (0, Value::Null);
        };
        let agent = Self::agent(vec![der]);
        let url = format!("{}{path}", self.api);
        let auth = token.map(|t| format!("Bearer {t}"));
        let result = match method {
            "POST" => {
                let mut r = agent.post(&url).header("content-type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.send(body.unwrap_or(""))
            }
            m => {
                let mut r = if m == "DELETE" {
                    agent.delete(&url)
                } else {
                    agent.get(&url)
                };
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.call()
            }
        };
        match result {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let text = response.body_mut().read_to_string().unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(_) => (0, Value::Null),
        }
    }

    fn new_token(&self, role: &str, name: &str, ttl_secs: Option<u64>) -> String {
        let mut body = json!({ "role": role, "name": name });
        if let Some(t) = ttl_secs {
            body["ttlSecs"] = json!(t);
        }
        let (status, answer) = self.call(
            "POST",
            "/v1/api-tokens",
            Some(&self.admin()),
            Some(&body.to_string()),
        );
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["role"], role);
        answer["token"].as_str().unwrap().to_owned()
    }

    fn cli(&self, args: &[&str], token: Option<&str>, ca: Option<&Path>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        cmd.args(args)
            .env("FLOTILLA_SERVER", &self.api)
            // No fallback to a controller of this machine's default data dir.
            .env("FLOTILLA_DATA_DIR", self.dir.join("nowhere"))
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_CA");
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(ca);
        }
        cmd.output().unwrap()
    }
}

const MANIFEST: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web}\n\
spec:\n  containers:\n  - name: main\n    image: oci:/images/busybox:latest\n";

fn error(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn roles_decide_who_may_do_what() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path());
    let admin = s.admin();
    assert!(admin.starts_with("fla_"), "{admin}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.dir.join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "admin.token is owner-only");

    // Open routes, and nothing else without a token.
    assert_eq!(s.call("GET", "/healthz", None, None).0, 200);
    let (status, body) = s.call("GET", "/v1/nodes", None, None);
    assert_eq!(status, 401);
    assert!(error(&body).contains("no api token"), "{body}");
    let (status, body) = s.call("GET", "/v1/nodes", Some("fla_unknown"), None);
    assert_eq!(status, 401);
    assert!(error(&body).contains("unknown or revoked"), "{body}");
    // A join with a bad join token gets past auth (open) and is refused by join.
    let (status, _) = s.call(
        "POST",
        "/v1/join",
        None,
        Some(r#"{"token":"flt_nope","node":"n1"}"#),
    );
    assert_eq!(status, 403);

    // A viewer reads, and its write is refused with nothing stored.
    let viewer = s.new_token("viewer", "dash", None);
    assert_eq!(s.call("GET", "/v1/nodes", Some(&viewer), None).0, 200);
    let (status, body) = s.call("POST", "/v1/apply", Some(&viewer), Some(MANIFEST));
    assert_eq!(status, 403, "{body}");
    assert!(
        error(&body).contains("needs the operator role")
            && error(&body).contains("\"dash\" is viewer"),
        "{body}"
    );
    let (_, listed) = s.call("GET", "/v1/workloads", Some(&viewer), None);
    assert_eq!(listed["items"], json!([]), "nothing stored");
    assert_eq!(
        s.call("DELETE", "/v1/workloads/web", Some(&viewer), None).0,
        403
    );
    let (status, body) = s.call("GET", "/v1/api-tokens", Some(&viewer), None);
    assert_eq!(status, 403);
    assert!(error(&body).contains("needs the admin role"), "{body}");

    // An operator changes workloads, but manages no identity.
    let operator = s.new_token("operator", "deployer", None);
    let (status, body) = s.call("POST", "/v1/apply", Some(&operator), Some(MANIFEST));
    assert_eq!(status, 200, "{body}");
    let (_, listed) = s.call("GET", "/v1/workloads", Some(&viewer), None);
    assert_eq!(listed["items"][0]["name"], "web");
    for (method, path, body) in [
        ("POST", "/v1/tokens", "{}"),
        ("POST", "/v1/nodes/n1/revoke", "{}"),
        ("POST", "/v1/api-tokens", r#"{"role":"admin"}"#),
    ] {
        let (status, answer) = s.call(method, path, Some(&operator), Some(body));
        assert_eq!(status, 403, "{method} {path}: {answer}");
    }
    // A route no one listed is refused even to the admin; an unknown path
    // is a 404 for a token holder only.
    assert_eq!(s.call("GET", "/v1/apply", Some(&admin), None).0, 403);
    assert_eq!(s.call("GET", "/v1/nope", Some(&admin), None).0, 404);
    assert_eq!(s.call("GET", "/v1/nope", None, None).0, 401);

    // The admin makes join tokens and lists API tokens, never their secrets.
    let (status, body) = s.call("POST", "/v1/tokens", Some(&admin), Some("{}"));
    assert_eq!(status, 200, "{body}");
    assert!(body["token"].as_str().unwrap().starts_with("flt_"));
    let (status, list) = s.call("GET", "/v1/api-tokens", Some(&admin), None);
    assert_eq!(status, 200);
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "dash", "deployer"]);
    let text = list.to_string();
    for secret in [&admin, &viewer, &operator] {
        assert!(!text.contains(secret.as_str()), "{text}");
    }

    // Revoked and expired tokens are refused.
    assert_eq!(
        s.call("DELETE", "/v1/api-tokens/deployer", Some(&admin), None)
            .0,
        200
    );
    let (status, body) = s.call("GET", "/v1/nodes", Some(&operator), None);
    assert_eq!(status, 401);
    assert!(error(&body).contains("unknown or revoked"), "{body}");
    let brief = s.new_token("viewer", "brief", Some(1));
    assert_eq!(s.call("GET", "/v1/nodes", Some(&brief), None).0, 200);
    let deadline = Instant::now() + T;
    let body = loop {
        let (status, body) = s.call("GET", "/v1/nodes", Some(&brief), None);
        if status == 401 {
            break body;
        }
        assert!(Instant::now() < deadline, "the token did not expire");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(error(&body).contains("\"brief\" has expired"), "{body}");

    // Tokens survive a restart; no second admin token is made.
    drop(s);
    let s = Serve::start(dir.path());
    assert_eq!(s.admin(), admin);
    assert_eq!(s.call("GET", "/v1/nodes", Some(&viewer), None).0, 200);
}

#[test]
fn https_with_the_fleet_ca_and_the_cli_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path());
    let ca = s.dir.join("ca.pem");
    let admin = s.admin();

    // Another CA's roots: the client refuses the server. Plain HTTP on the
    // HTTPS port gets no answer.
    let agent = Serve::agent(vec![]);
    assert!(agent.get(&format!("{}/healthz", s.api)).call().is_err());
    let plain = s.api.replace("https://", "http://");
    let answer = ureq::get(&format!("{plain}/healthz")).call();
    assert!(answer.is_err() || answer.unwrap().status() != 200);

    // The CLI: a viewer lists nodes, its apply is refused.
    let viewer = s.new_token("viewer", "ro", None);
    let out = s.cli(&["get", "nodes"], Some(&viewer), Some(&ca));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = dir.path().join("web.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let file = manifest.to_str().unwrap();
    let out = s.cli(&["apply", "-f", file], Some(&viewer), Some(&ca));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs the operator role"), "{err}");
    // Without the CA the CLI refuses the server, and says what to do.
    let out = s.cli(&["get", "nodes"], Some(&viewer), None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS") && err.contains("--ca"), "{err}");
    // Without a token: 401's message.
    let out = s.cli(&["get", "nodes"], None, Some(&ca));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no api token"),
        "{err}"
    );

    // api-token create / list / revoke.
    let out = s.cli(
        &[
            "api-token",
            "create",
            "--role",
            "operator",
            "--name",
            "ci",
            "--ttl",
            "1h",
        ],
        Some(&admin),
        Some(&ca),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ci = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(ci.starts_with("fla_"), "{ci}");
    let out = s.cli(&["apply", "-f", file], Some(&ci), Some(&ca));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli(&["api-token", "list"], Some(&admin), Some(&ca));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("ci") && table.contains("operator") && table.contains("in "),
        "{table}"
    );
    assert!(!table.contains(&ci) && !table.contains(&admin), "{table}");
    let out = s.cli(&["api-token", "revoke", "ci"], Some(&admin), Some(&ca));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli(&["get", "workloads"], Some(&ci), Some(&ca));
    assert!(!out.status.success());

    // A join token carries the CA's fingerprint, for devices to pin.
    let out = s.cli(&["token", "create"], Some(&admin), Some(&ca));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (secret, pin) = token.split_once('.').unwrap();
    assert!(secret.starts_with("flt_"));
    use base64::Engine;
    let expected =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(s.ca_der()));
    assert_eq!(pin, expected);
}

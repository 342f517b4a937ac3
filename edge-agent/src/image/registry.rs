//! The OCI distribution API client: manifests and (ranged) blob downloads
//! from a registry or its mirrors, over HTTPS with the system's roots plus
//! configured CAs, or plain HTTP for registries configured as insecure; basic
//! and bearer-token authentication. Blocking (ureq): called from the pull,
//! which runs on a blocking thread.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use super::auth::{self, Challenge, PullSecrets};
use super::layout::{DOCKER_LIST, DOCKER_MANIFEST, MAX_JSON, OCI_INDEX, OCI_MANIFEST};
use super::reference::DOCKER_HUB;
use super::settings::{Credentials, PullSettings, RegistrySettings};

/// Time to connect (DNS, TCP, TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Time from request to response headers.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one response body may take. A blob download that takes longer is
/// cut and resumed from where it got (HTTP Range), so this is what bounds a
/// stalled link, not the size of a blob.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest token response read.
const MAX_TOKEN_RESPONSE: u64 = 1024 * 1024;

/// How a request failed, which decides what the pull does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HttpError {
    /// Worth trying again: the link, a timeout, 429, 5xx.
    #[error("{0}")]
    Transient(String),
    /// 404: the registry has no such manifest or blob.
    #[error("{0}")]
    NotFound(String),
    /// 401 or 403 even with every credential there is for the registry.
    #[error("{0}")]
    Unauthorized(String),
    /// Anything else: trying again would not help.
    #[error("{0}")]
    Fatal(String),
}

/// One registry to ask: the origin or a mirror.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// `host[:port]` as configured and as written in references.
    pub host: String,
    /// Base URL, `https://registry-1.docker.io`.
    base: String,
    settings: RegistrySettings,
    /// Credentials to try in turn: the pod's pull secrets for this host,
    /// then the registries file's; each labelled with where it came from.
    credentials: Vec<(String, Credentials)>,
    /// Keys the cached `Authorization` of this credential list.
    auth_key: [u8; 32],
    /// Pull secrets that could not be used, for a refusal's message.
    problems: Vec<String>,
    /// The pull's connections.
    connections: Connections,
}

/// The connections of one pull, an HTTP agent per host. Closing them
/// interrupts the pull's requests in flight at once, so that a cancelled
/// pull neither keeps a slow link busy with a response nobody will read
/// nor keeps the partial blob it holds from the pull that takes it over.
#[derive(Debug, Clone, Default)]
pub(crate) struct Connections(Arc<Mutex<Agents>>);

#[derive(Debug, Default)]
struct Agents {
    by_host: HashMap<String, ureq::Agent>,
    closed: bool,
}

impl Connections {
    /// Closes every connection, now and for the pull's later requests.
    pub fn close(&self) {
        let agents = {
            let mut a = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            a.closed = true;
            std::mem::take(&mut a.by_host)
        };
        for agent in agents.into_values() {
            agent.shutdown();
        }
    }
}

/// A blob response positioned at `start`.
pub(crate) struct BlobBody {
    /// Offset of the first byte of `reader` (0 when the server sent it all).
    pub start: u64,
    /// The body.
    pub reader: ureq::BodyReader<'static>,
}

/// A manifest as the registry sent it.
pub(crate) struct ManifestBody {
    pub bytes: Vec<u8>,
    /// Its `Content-Type`, when it is one of the manifest types we know.
    pub media_type: Option<String>,
}

/// Host, repository and the fingerprint of the credentials tried there.
type AuthKey = (String, String, [u8; 32]);

/// The registry client. Cheap to share; tokens are cached per registry and
/// repository.
pub(crate) struct Client {
    settings: PullSettings,
    /// `Authorization` values: what one pod's secrets opened is not used
    /// for another.
    auth: Mutex<HashMap<AuthKey, String>>,
}

impl Client {
    pub fn new(settings: PullSettings) -> Self {
        Self {
            settings,
            auth: Mutex::default(),
        }
    }

    /// The settings the client was made with.
    pub fn settings(&self) -> &PullSettings {
        &self.settings
    }

    /// Where to look for images of `registry`: its mirrors in order, then
    /// the registry itself, each with the credentials to try there (`secrets`
    /// for that host first), all over `connections`.
    pub fn endpoints(
        &self,
        registry: &str,
        secrets: &PullSecrets,
        connections: &Connections,
    ) -> Vec<Endpoint> {
        let origin = self.settings.registry(registry);
        origin
            .mirrors
            .iter()
            .map(String::as_str)
            .chain([registry])
            .map(|host| {
                let settings = self.settings.registry(host);
                let api = if host == DOCKER_HUB {
                    "registry-1.docker.io"
                } else {
                    host
                };
                let scheme = if settings.insecure { "http" } else { "https" };
                let mut credentials = secrets.for_host(host);
                if let Some(c) = &settings.credentials {
                    credentials.push(("the registries file".to_owned(), c.clone()));
                }
                Endpoint {
                    host: host.to_owned(),
                    base: format!("{scheme}://{api}"),
                    auth_key: auth::fingerprint(&credentials),
                    credentials,
                    problems: secrets.problems().to_vec(),
                    settings,
                    connections: connections.clone(),
                }
            })
            .collect()
    }

    /// `GET /v2/{repo}/manifests/{reference}`, capped at [`MAX_JSON`].
    pub fn manifest(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
    ) -> Result<ManifestBody, HttpError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", ep.base);
        let accept = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].join(", ");
        let what = format!("manifest {reference} of {}/{repo}", ep.host);
        let response = self.send(ep, repo, &url, &[("Accept", accept.as_str())], &what)?;
        let media_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .filter(|m| {
                [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].contains(&m.as_str())
            });
        let mut bytes = Vec::new();
        response
            .into_body()
            .into_reader()
            .take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| HttpError::Transient(format!("{what}: reading: {e}")))?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(HttpError::Fatal(format!(
                "{what}: larger than {MAX_JSON} bytes"
            )));
        }
        Ok(ManifestBody { bytes, media_type })
    }

    /// `GET /v2/{repo}/blobs/{digest}`, from byte `offset` on when it is not 0.
    pub fn blob(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &str,
        offset: u64,
    ) -> Result<BlobBody, HttpError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", ep.base);
        let what = format!("blob {digest} from {}/{repo}", ep.host);
        let range = format!("bytes={offset}-");
        let headers: &[(&str, &str)] = if offset > 0 {
            &[("Range", range.as_str())]
        } else {
            &[]
        };
        let response = self.send(ep, repo, &url, headers, &what)?;
        let start = if response.status().as_u16() == 206 {
            let header = response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let start = header
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.trim().parse::<u64>().ok());
            match start {
                Some(s) if s == offset => s,
                _ => {
                    return Err(HttpError::Transient(format!(
                        "{what}: asked for bytes from {offset}, got Content-Range {header:?}"
                    )));
                }
            }
        } else {
            0
        };
        Ok(BlobBody {
            start,
            reader: response.into_body().into_reader(),
        })
    }

    /// Sends a GET, answering one authentication challenge if the registry
    /// asks for it.
    fn send(
        &self,
        ep: &Endpoint,
        repo: &str,
        url: &str,
        headers: &[(&str, &str)],
        what: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, HttpError> {
        let agent = self.agent(ep)?;
        let key = (ep.host.clone(), repo.to_owned(), ep.auth_key);
        // The next credential to answer a challenge with; with none, one
        // anonymous answer (a public image's bearer token).
        let mut next = 0;
        let answers = ep.credentials.len().max(1);
        loop {
            let mut request = agent.get(url);
            for (k, v) in headers {
                request = request.header(*k, *v);
            }
            let cached = self.auth.lock().ok().and_then(|a| a.get(&key).cloned());
            if let Some(value) = &cached {
                request = request.header("Authorization", value.as_str());
            }
            let response = request.call().map_err(|e| transport_error(what, &e))?;
            let status = response.status().as_u16();
            match status {
                200 | 206 => return Ok(response),
                401 if next < answers => {
                    if let Ok(mut a) = self.auth.lock() {
                        a.remove(&key);
                    }
                    let challenge = response
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .and_then(auth::parse_challenge);
                    let mut answer = None;
                    while answer.is_none() && next < answers {
                        let creds = ep.credentials.get(next);
                        next += 1;
                        match self.answer(ep, repo, challenge.clone(), creds, what) {
                            Ok(value) => answer = Some(Ok(value)),
                            // A token server refused these: the next ones.
                            Err(e @ HttpError::Unauthorized(_)) if next < answers => {
                                tracing::info!(registry = %ep.host, "{e}; trying the next credentials");
                            }
                            Err(e) => answer = Some(Err(e)),
                        }
                    }
                    match answer {
                        Some(Ok(value)) => {
                            if let Ok(mut a) = self.auth.lock() {
                                a.insert(key.clone(), value);
                            }
                        }
                        Some(Err(HttpError::Unauthorized(m))) => {
                            return Err(HttpError::Unauthorized(format!(
                                "{m}{}",
                                problems_note(&ep.problems)
                            )));
                        }
                        Some(Err(e)) => return Err(e),
                        None => {
                            return Err(HttpError::Unauthorized(format!(
                                "{what}: no credentials left to try"
                            )));
                        }
                    }
                }
                401 | 403 => {
                    if let Ok(mut a) = self.auth.lock() {
                        a.remove(&key);
                    }
                    let how = match ep.credentials.as_slice() {
                        [] => "no credentials are configured for this registry".to_owned(),
                        tried => {
                            let sources: Vec<&str> =
                                tried.iter().map(|(s, _)| s.as_str()).collect();
                            format!("the credentials were refused ({})", sources.join(", then "))
                        }
                    };
                    return Err(HttpError::Unauthorized(format!(
                        "{what}: {status} unauthorized: {how}{}",
                        problems_note(&ep.problems)
                    )));
                }
                404 => return Err(HttpError::NotFound(format!("{what}: not found (404)"))),
                408 | 429 | 500..=599 => {
                    return Err(HttpError::Transient(format!("{what}: status {status}")));
                }
                _ => return Err(HttpError::Fatal(format!("{what}: status {status}"))),
            }
        }
    }

    /// The `Authorization` value that answers `challenge` with `creds`
    /// (labelled with where they came from), or anonymously.
    fn answer(
        &self,
        ep: &Endpoint,
        repo: &str,
        challenge: Option<Challenge>,
        creds: Option<&(String, Credentials)>,
        what: &str,
    ) -> Result<String, HttpError> {
        let (source, creds) = match creds {
            Some((source, c)) => (source.as_str(), Some(c)),
            None => ("", None),
        };
        match challenge {
            Some(Challenge::Basic) => match creds {
                Some(c) => Ok(auth::basic(&c.username, &c.password)),
                None => Err(HttpError::Unauthorized(format!(
                    "{what}: the registry asks for a user name and password; none are configured for {}",
                    ep.host
                ))),
            },
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let scope = scope.unwrap_or_else(|| format!("repository:{repo}:pull"));
                let mut url = format!("{realm}?scope={}", auth::encode(&scope));
                if let Some(service) = service {
                    url.push_str(&format!("&service={}", auth::encode(&service)));
                }
                // Credentials travel to a plain-HTTP realm only from a
                // registry the operator already talks to in plain HTTP.
                let realm_safe = realm.starts_with("https://") || ep.settings.insecure;
                let agent = self.agent(ep)?;
                let mut request = agent.get(&url);
                if let (Some(c), true) = (creds, realm_safe) {
                    request =
                        request.header("Authorization", auth::basic(&c.username, &c.password));
                }
                let token_what = format!("{what}: token from {realm}");
                let response = request
                    .call()
                    .map_err(|e| transport_error(&token_what, &e))?;
                match response.status().as_u16() {
                    200 => {}
                    401 | 403 => {
                        let whose = match creds {
                            Some(_) => format!("the credentials were refused ({source})"),
                            None => "anonymous access was refused".to_owned(),
                        };
                        return Err(HttpError::Unauthorized(format!(
                            "{token_what}: status {}: {whose}",
                            response.status().as_u16()
                        )));
                    }
                    s => return Err(HttpError::Transient(format!("{token_what}: status {s}"))),
                }
                let mut body = Vec::new();
                response
                    .into_body()
                    .into_reader()
                    .take(MAX_TOKEN_RESPONSE)
                    .read_to_end(&mut body)
                    .map_err(|e| HttpError::Transient(format!("{token_what}: {e}")))?;
                let token = auth::parse_token(&body)
                    .map_err(|e| HttpError::Fatal(format!("{token_what}: {e}")))?;
                Ok(format!("Bearer {token}"))
            }
            None => Err(HttpError::Unauthorized(format!(
                "{what}: 401 without a usable WWW-Authenticate challenge"
            ))),
        }
    }

    /// The HTTP agent for an endpoint: one per host and pull, trusting the
    /// system's roots plus that host's CA.
    fn agent(&self, ep: &Endpoint) -> Result<ureq::Agent, HttpError> {
        let mut agents = ep
            .connections
            .0
            .lock()
            .map_err(|_| HttpError::Fatal("registry client: lock poisoned".to_owned()))?;
        if agents.closed {
            return Err(HttpError::Transient(format!(
                "{}: the pull's connections are closed (cancelled)",
                ep.host
            )));
        }
        if let Some(agent) = agents.by_host.get(&ep.host) {
            return Ok(agent.clone());
        }
        let mut roots: Vec<Certificate<'static>> = system_roots().as_ref().clone();
        roots.extend(
            ep.settings
                .ca
                .iter()
                .map(|der| Certificate::from_der(der).to_owned()),
        );
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::from(roots))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .user_agent(concat!("flotilla-agent/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(RESPONSE_TIMEOUT))
            .timeout_recv_body(Some(BODY_TIMEOUT))
            .build()
            .into();
        agents.by_host.insert(ep.host.clone(), agent.clone());
        Ok(agent)
    }
}

/// The system's CA certificates, loaded once.
fn system_roots() -> Arc<Vec<Certificate<'static>>> {
    static ROOTS: OnceLock<Arc<Vec<Certificate<'static>>>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!("loading the system's CA certificates: {e}");
            }
            Arc::new(
                found
                    .certs
                    .iter()
                    .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                    .collect(),
            )
        })
        .clone()
}

/// `; pull secret "x" could not be used: …` for each unusable pull secret.
fn problems_note(problems: &[String]) -> String {
    problems.iter().map(|p| format!("; {p}")).collect()
}

fn transport_error(what: &str, e: &ureq::Error) -> HttpError {
    match e {
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => HttpError::Fatal(format!("{what}: {e}")),
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => {
            HttpError::Fatal(format!("{what}: TLS: {e}"))
        }
        _ => HttpError::Transient(format!("{what}: {e}")),
    }
}

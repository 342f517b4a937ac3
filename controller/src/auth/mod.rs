//! Who may call which API route: bearer API tokens checked by one
//! middleware against one table of route → least role ([`ROUTES`]). A route
//! missing from the table is refused to everyone, so a new route cannot be
//! left open by accident. [`tls`] serves the API over HTTPS; [`routes`] are
//! the API-token routes and [`cli`] their commands.

pub mod cli;
pub mod routes;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::identity::Identity;
use crate::identity::api_tokens::{ApiTokenError, ApiTokens, Refusal, Role};
use tls::{ApiTls, TlsError, TlsListener};

/// Why the API's tokens or TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token store failed, or the admin token could not be written.
    #[error(transparent)]
    Tokens(#[from] ApiTokenError),
    /// The certificate could not be made or loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What `serve` needs to guard the API.
pub struct Guard {
    /// The API tokens.
    pub tokens: Arc<ApiTokens>,
    /// HTTPS settings; `None`: plain HTTP (loopback only).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Opens the API tokens (writing `{data_dir}/admin.token` on a first start)
/// and makes the TLS settings. Blocking.
pub fn prepare(
    identity: Arc<Identity>,
    data_dir: &Path,
    tls: &ApiTls,
    listen: SocketAddr,
) -> Result<Guard, AuthError> {
    let tokens = ApiTokens::open(identity)?;
    if let Some(path) = tokens.bootstrap(data_dir)? {
        tracing::info!(path = %path.display(), "first start: admin api token written");
    }
    let tls = tls::server_config(tls, data_dir, listen)?;
    Ok(Guard {
        tokens: Arc::new(tokens),
        tls,
    })
}

/// Serves `app`, guarded by `guard` (the API-token routes added), on
/// `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    guard: Guard,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = protect(
        app.merge(routes::router(Arc::clone(&guard.tokens))),
        guard.tokens,
    );
    match guard.tls {
        Some(config) => {
            axum::serve(TlsListener::new(listener, config)?, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token: liveness, and `join` (which carries its
    /// own join token).
    Open,
    /// A token of this role or above.
    Least(Role),
}

/// Every route of the API with the least role that may use it; paths as
/// axum matches them. A route not listed here is refused to everyone
/// (`403`), whatever the token: add a new route here when adding it to
/// the router.
pub const ROUTES: &[(Method, &str, Access)] = {
    use Access::{Least, Open};
    use Role::{Admin, Operator, Viewer};
    &[
        (Method::GET, "/healthz", Open),
        (Method::POST, "/v1/join", Open),
        // Signed by the device's current key (identity/certs.rs).
        (Method::POST, "/v1/renew", Open),
        // Reads.
        (Method::GET, "/v1/nodes", Least(Viewer)),
        (Method::GET, "/v1/nodes/{name}", Least(Viewer)),
        (Method::GET, "/v1/workloads", Least(Viewer)),
        (Method::GET, "/v1/workloads/{name}", Least(Viewer)),
        (Method::GET, "/v1/workloads/{name}/revisions", Least(Viewer)),
        (Method::GET, "/v1/workloads/{name}/rollout", Least(Viewer)),
        // Names, types, keys and sizes; never values.
        (Method::GET, "/v1/secrets", Least(Viewer)),
        (Method::GET, "/v1/secrets/{name}", Least(Viewer)),
        (Method::GET, "/v1/namespaces", Least(Viewer)),
        (Method::GET, "/v1/namespaces/{name}", Least(Viewer)),
        (Method::GET, "/v1/pods", Least(Viewer)),
        (Method::GET, "/v1/pods/{name}", Least(Viewer)),
        // Logs carry what applications print, secrets included.
        (Method::GET, "/v1/pods/{name}/logs", Least(Operator)),
        // Runs a command in a container: what the operator may change anyway.
        (Method::POST, "/v1/pods/{name}/exec", Least(Operator)),
        // Changes to what runs where.
        (Method::POST, "/v1/apply", Least(Operator)),
        (Method::POST, "/v1/nodes/{name}/labels", Least(Operator)),
        (Method::DELETE, "/v1/workloads/{name}", Least(Operator)),
        (Method::DELETE, "/v1/secrets/{name}", Least(Operator)),
        (Method::POST, "/v1/workloads/{name}/undo", Least(Operator)),
        (
            Method::POST,
            "/v1/workloads/{name}/rollout/pause",
            Least(Operator),
        ),
        (
            Method::POST,
            "/v1/workloads/{name}/rollout/resume",
            Least(Operator),
        ),
        // Identity: who may join, who may connect, who may call the API.
        (Method::POST, "/v1/tokens", Least(Admin)),
        (Method::POST, "/v1/nodes/{name}/revoke", Least(Admin)),
        (Method::POST, "/v1/broker-config/mosquitto", Least(Admin)),
        (Method::GET, "/v1/api-tokens", Least(Admin)),
        (Method::POST, "/v1/api-tokens", Least(Admin)),
        (Method::DELETE, "/v1/api-tokens/{name}", Least(Admin)),
        // Namespaces grant privileges (applying one needs an admin too:
        // `api::apply` checks the caller's role).
        (Method::DELETE, "/v1/namespaces/{name}", Least(Admin)),
    ]
};

/// Who may use `method path`; `None`: the route is not in the table.
pub fn access(method: &Method, path: &str) -> Option<Access> {
    ROUTES
        .iter()
        .find(|(m, p, _)| m == method && *p == path)
        .map(|(_, _, a)| *a)
}

/// The name and role of the token a request was admitted with, for the
/// handlers that want to know (e.g. to log who changed what).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// `router` with every request checked against [`ROUTES`] and `tokens`.
pub fn protect(router: Router, tokens: Arc<ApiTokens>) -> Router {
    router.layer(middleware::from_fn_with_state(tokens, check))
}

fn refuse(status: StatusCode, message: String) -> Response {
    let mut response = (status, axum::Json(json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn check(State(tokens): State<Arc<ApiTokens>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    // No matched path: nothing answers there but a 404, which a caller
    // with any good token may see.
    let (path, access) = match req.extensions().get::<MatchedPath>() {
        Some(p) => (p.as_str().to_owned(), access(&method, p.as_str())),
        None => (
            req.uri().path().to_owned(),
            Some(Access::Least(Role::Viewer)),
        ),
    };
    let need = match access {
        Some(Access::Open) => return next.run(req).await,
        Some(Access::Least(role)) => role,
        None => {
            tracing::warn!(%method, %path, "route missing from the role table: refused");
            return refuse(
                StatusCode::FORBIDDEN,
                format!("{method} {path} is not open to any role"),
            );
        }
    };
    let Some(token) = bearer(req.headers()) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "no api token: pass one with --token or FLOTILLA_TOKEN \
             (an admin makes them with `flotilla api-token create`)"
                .into(),
        );
    };
    let (name, role) = match tokens.authenticate(token) {
        Ok(who) => who,
        Err(Refusal::Unknown) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "api token refused: unknown or revoked".into(),
            );
        }
        Err(Refusal::Expired(name)) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                format!("api token {name:?} has expired: ask an admin for a new one"),
            );
        }
    };
    if role < need {
        tracing::info!(token = %name, role = role.as_str(), %method, %path, "refused: role too low");
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "{method} {path} needs the {} role; api token {name:?} is {}",
                need.as_str(),
                role.as_str()
            ),
        );
    }
    if method != Method::GET {
        tracing::info!(token = %name, %method, uri = %req.uri(), "api call");
    }
    req.extensions_mut().insert(Caller { name, role });
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_one_entry_per_route_and_reads_are_the_viewers() {
        for (i, (m, p, _)) in ROUTES.iter().enumerate() {
            assert!(
                !ROUTES[..i].iter().any(|(m2, p2, _)| m2 == m && p2 == p),
                "{m} {p} listed twice"
            );
        }
        for (m, p, a) in ROUTES {
            if *m != Method::GET {
                assert_ne!(
                    *a,
                    Access::Least(Role::Viewer),
                    "{m} {p}: a write for viewers"
                );
            }
        }
        assert_eq!(
            access(&Method::DELETE, "/v1/workloads/{name}"),
            Some(Access::Least(Role::Operator))
        );
        assert_eq!(access(&Method::PUT, "/v1/workloads/{name}"), None);
    }

    #[test]
    fn bearer_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer fla_x".parse().unwrap());
        assert_eq!(bearer(&h), Some("fla_x"));
        h.insert(header::AUTHORIZATION, "bearer  fla_y ".parse().unwrap());
        assert_eq!(bearer(&h), Some("fla_y"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}

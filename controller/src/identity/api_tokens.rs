//! API tokens: the bearer tokens of the HTTP API, each with a name, a role
//! and an expiry, kept in `identity.redb` as sha256 hashes only (256 random
//! bits, like join tokens, so the hash cannot be reversed). Checks read an
//! in-memory copy that every change updates after it is committed, and
//! compare the presented token's hash with every stored one in constant time.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use flotilla_proto::check_name;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Identity, now_ms, random_secret, same, sha256};

/// Name → (sha256(token), role, created ms, expires ms; 0 = never).
const API_TOKENS: TableDefinition<&str, (&[u8], u8, u64, u64)> = TableDefinition::new("api_tokens");

/// Prefix of API tokens (join tokens are `flt_`), so a leaked one is
/// recognisable and cannot be mistaken for the other kind.
pub const API_TOKEN_PREFIX: &str = "fla_";
/// The file `serve` writes the first admin token to, in its data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The name of that first token.
pub const BOOTSTRAP_NAME: &str = "admin";
/// Longest token accepted for checking.
const MAX_TOKEN_LEN: usize = 128;

/// What a token may do; each role can do all the one below it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads (GET) only.
    Viewer,
    /// Changes workloads, node labels and rollouts; reads logs.
    Operator,
    /// Everything, identity included: join tokens, node revocation, API tokens.
    Admin,
}

impl Role {
    /// Parses `viewer`, `operator` or `admin`.
    pub fn parse(s: &str) -> Result<Role, ApiTokenError> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(ApiTokenError::BadRole(other.to_owned())),
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    fn code(self) -> u8 {
        match self {
            Role::Viewer => 1,
            Role::Operator => 2,
            Role::Admin => 3,
        }
    }

    fn from_code(code: u8) -> Option<Role> {
        match code {
            1 => Some(Role::Viewer),
            2 => Some(Role::Operator),
            3 => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Why an API token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiTokenError {
    /// The identity database could not be read or written.
    #[error("api token store {op}: {source}")]
    Db {
        op: &'static str,
        source: redb::Error,
    },
    /// The role is not one of the three.
    #[error("role {0:?}: expected viewer, operator or admin")]
    BadRole(String),
    /// The token name breaks the name rule.
    #[error("api token name {name:?}: {error}")]
    BadName {
        name: String,
        error: flotilla_proto::NameError,
    },
    /// A token of that name exists.
    #[error("api token {0:?} exists: revoke it first or choose another name")]
    Exists(String),
    /// No token of that name.
    #[error("api token {0:?} not found")]
    NotFound(String),
    /// The system random source failed.
    #[error("no randomness")]
    Random,
    /// The admin token file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn db_err<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> ApiTokenError {
    move |e| ApiTokenError::Db {
        op,
        source: e.into(),
    }
}

/// A token as listed: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenInfo {
    /// Its name (a DNS label).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was made, ms since the epoch.
    pub created_ms: u64,
    /// When it stops working, ms since the epoch; `None`: never.
    pub expires_ms: Option<u64>,
}

/// A new token: the secret, shown once, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiToken {
    /// The secret.
    pub token: String,
    /// Its record.
    pub info: ApiTokenInfo,
}

/// Why a presented token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No stored token has this hash (never made, or revoked).
    Unknown,
    /// The token named here has expired.
    Expired(String),
}

#[derive(Debug, Clone)]
struct Record {
    hash: [u8; 32],
    info: ApiTokenInfo,
}

/// The API tokens of one controller.
pub struct ApiTokens {
    identity: Arc<Identity>,
    cache: RwLock<Vec<Record>>,
}

impl ApiTokens {
    /// Opens the token table of `identity` (creating it). Blocking.
    pub fn open(identity: Arc<Identity>) -> Result<Self, ApiTokenError> {
        let db = &identity.db;
        let tx = db.begin_write().map_err(db_err("begin"))?;
        tx.open_table(API_TOKENS).map_err(db_err("create table"))?;
        tx.commit().map_err(db_err("commit"))?;
        let mut records = Vec::new();
        {
            let tx = db.begin_read().map_err(db_err("begin"))?;
            let table = tx.open_table(API_TOKENS).map_err(db_err("open table"))?;
            for entry in table.iter().map_err(db_err("read"))? {
                let (name, value) = entry.map_err(db_err("read"))?;
                let (hash, role, created_ms, expires_ms) = value.value();
                let (Ok(hash), Some(role)) = (<[u8; 32]>::try_from(hash), Role::from_code(role))
                else {
                    tracing::warn!(name = name.value(), "api token record unreadable: ignored");
                    continue;
                };
                records.push(Record {
                    hash,
                    info: ApiTokenInfo {
                        name: name.value().to_owned(),
                        role,
                        created_ms,
                        expires_ms: (expires_ms != 0).then_some(expires_ms),
                    },
                });
            }
        }
        Ok(Self {
            identity,
            cache: RwLock::new(records),
        })
    }

    /// Makes a token named `name` with `role`, valid for `ttl_ms` (`None`:
    /// until revoked). Blocking.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        ttl_ms: Option<u64>,
    ) -> Result<NewApiToken, ApiTokenError> {
        check_name(name).map_err(|error| ApiTokenError::BadName {
            name: name.to_owned(),
            error,
        })?;
        let token = random_secret(API_TOKEN_PREFIX).map_err(|_| ApiTokenError::Random)?;
        let hash = sha256(token.as_bytes());
        let created_ms = now_ms();
        // Never 0, which means "never expires".
        let expires_ms = ttl_ms.map(|t| created_ms.saturating_add(t).max(1));
        let tx = self.identity.db.begin_write().map_err(db_err("begin"))?;
        {
            let mut table = tx.open_table(API_TOKENS).map_err(db_err("open table"))?;
            if table.get(name).map_err(db_err("read"))?.is_some() {
                return Err(ApiTokenError::Exists(name.to_owned()));
            }
            table
                .insert(
                    name,
                    (&hash[..], role.code(), created_ms, expires_ms.unwrap_or(0)),
                )
                .map_err(db_err("insert"))?;
        }
        tx.commit().map_err(db_err("commit"))?;
        let info = ApiTokenInfo {
            name: name.to_owned(),
            role,
            created_ms,
            expires_ms,
        };
        self.write_cache().push(Record {
            hash,
            info: info.clone(),
        });
        Ok(NewApiToken { token, info })
    }

    /// Every token's record, by name.
    pub fn list(&self) -> Vec<ApiTokenInfo> {
        let mut list: Vec<ApiTokenInfo> = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|r| r.info.clone())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Removes the token `name`: refused from the next request on. Blocking.
    pub fn revoke(&self, name: &str) -> Result<(), ApiTokenError> {
        let tx = self.identity.db.begin_write().map_err(db_err("begin"))?;
        {
            let mut table = tx.open_table(API_TOKENS).map_err(db_err("open table"))?;
            if table.remove(name).map_err(db_err("remove"))?.is_none() {
                return Err(ApiTokenError::NotFound(name.to_owned()));
            }
        }
        tx.commit().map_err(db_err("commit"))?;
        self.write_cache().retain(|r| r.info.name != name);
        Ok(())
    }

    /// Who presents `token`. Memory only. Every stored hash is compared, in
    /// constant time, so the time taken tells nothing about which matched.
    pub fn authenticate(&self, token: &str) -> Result<(String, Role), Refusal> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Refusal::Unknown);
        }
        let hash = sha256(token.as_bytes());
        let cache = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = None;
        for record in cache.iter() {
            if same(&hash, &record.hash) {
                found = Some(&record.info);
            }
        }
        let info = found.ok_or(Refusal::Unknown)?;
        if info.expires_ms.is_some_and(|e| e <= now_ms()) {
            return Err(Refusal::Expired(info.name.clone()));
        }
        Ok((info.name.clone(), info.role))
    }

    /// On a store with no API token at all (a first start, or every token
    /// revoked), makes an admin token that never expires and writes it,
    /// owner-only, to `{dir}/admin.token`; returns that path. Blocking.
    pub fn bootstrap(&self, dir: &Path) -> Result<Option<PathBuf>, ApiTokenError> {
        if !self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
        {
            return Ok(None);
        }
        let path = dir.join(ADMIN_TOKEN_FILE);
        let io_err = |source| ApiTokenError::Io {
            path: path.clone(),
            source,
        };
        // The file is in place before the token is stored: a crash in
        // between leaves a file with a dead token, which the next start
        // replaces, never a stored admin token that no file holds.
        let token = random_secret(API_TOKEN_PREFIX).map_err(|_| ApiTokenError::Random)?;
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        file.write_all(format!("{token}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err)?;
        std::fs::rename(&tmp, &path).map_err(io_err)?;
        self.store_bootstrap(&token)?;
        Ok(Some(path))
    }

    fn store_bootstrap(&self, token: &str) -> Result<(), ApiTokenError> {
        let hash = sha256(token.as_bytes());
        let created_ms = now_ms();
        let tx = self.identity.db.begin_write().map_err(db_err("begin"))?;
        {
            let mut table = tx.open_table(API_TOKENS).map_err(db_err("open table"))?;
            table
                .insert(
                    BOOTSTRAP_NAME,
                    (&hash[..], Role::Admin.code(), created_ms, 0),
                )
                .map_err(db_err("insert"))?;
        }
        tx.commit().map_err(db_err("commit"))?;
        let mut cache = self.write_cache();
        cache.retain(|r| r.info.name != BOOTSTRAP_NAME);
        cache.push(Record {
            hash,
            info: ApiTokenInfo {
                name: BOOTSTRAP_NAME.to_owned(),
                role: Role::Admin,
                created_ms,
                expires_ms: None,
            },
        });
        Ok(())
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Record>> {
        self.cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_roles_expire_are_revoked_and_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = ApiTokens::open(Identity::open(dir.path(), false).unwrap()).unwrap();
        let file = tokens.bootstrap(dir.path()).unwrap().unwrap();
        let admin = std::fs::read_to_string(&file).unwrap();
        let admin = admin.trim();
        assert!(admin.starts_with(API_TOKEN_PREFIX));
        let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            tokens.authenticate(admin),
            Ok(("admin".into(), Role::Admin))
        );
        assert_eq!(tokens.bootstrap(dir.path()).unwrap(), None, "only once");

        let viewer = tokens.create("ci", Role::Viewer, Some(60_000)).unwrap();
        assert_eq!(
            tokens.authenticate(&viewer.token),
            Ok(("ci".into(), Role::Viewer))
        );
        assert!(matches!(
            tokens.create("ci", Role::Admin, None),
            Err(ApiTokenError::Exists(_))
        ));
        assert!(matches!(
            tokens.create("Bad_Name", Role::Admin, None),
            Err(ApiTokenError::BadName { .. })
        ));
        let expired = tokens.create("old", Role::Operator, Some(0)).unwrap();
        assert_eq!(
            tokens.authenticate(&expired.token),
            Err(Refusal::Expired("old".into()))
        );
        assert_eq!(tokens.authenticate("fla_nope"), Err(Refusal::Unknown));
        assert_eq!(
            tokens.authenticate(&"x".repeat(4096)),
            Err(Refusal::Unknown)
        );
        let names: Vec<String> = tokens.list().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["admin", "ci", "old"]);

        tokens.revoke("ci").unwrap();
        assert_eq!(tokens.authenticate(&viewer.token), Err(Refusal::Unknown));
        assert!(matches!(
            tokens.revoke("ci"),
            Err(ApiTokenError::NotFound(_))
        ));

        // Durable, and never in the file in the clear.
        drop(tokens);
        let raw = std::fs::read(dir.path().join("identity.redb")).unwrap();
        for secret in [admin, expired.token.as_str()] {
            assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
        let tokens = ApiTokens::open(Identity::open(dir.path(), false).unwrap()).unwrap();
        assert_eq!(
            tokens.authenticate(admin),
            Ok(("admin".into(), Role::Admin))
        );
        assert_eq!(tokens.authenticate(&viewer.token), Err(Refusal::Unknown));
        assert_eq!(tokens.list().len(), 2);
    }
}

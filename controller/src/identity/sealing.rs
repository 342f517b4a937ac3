//! Devices' sealing keys: the X25519 public key each agent sends at `join`,
//! for which the controller seals that node's secrets. Kept in
//! `identity.redb` (node → 32 bytes) with an in-memory copy the control
//! loop reads without blocking. A public key is no secret; losing it only
//! means the node's pods with secrets fail until it enrols again.

use std::collections::HashMap;
use std::sync::RwLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Identity, IdentityError, db_err};

/// Node → X25519 public key.
const SEALING_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("sealing_keys");

/// The in-memory copy of every node's sealing key.
#[derive(Debug, Default)]
pub struct SealingKeys(RwLock<HashMap<String, [u8; 32]>>);

impl SealingKeys {
    /// Reads every stored key (none when the table was never written).
    pub(super) fn load(db: &Database) -> Result<Self, IdentityError> {
        let mut map = HashMap::new();
        let tx = db.begin_read().map_err(db_err("begin"))?;
        let table = match tx.open_table(SEALING_KEYS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Self::default()),
            Err(e) => return Err(db_err("open table")(e)),
        };
        for entry in table.iter().map_err(db_err("read"))? {
            let (node, key) = entry.map_err(db_err("read"))?;
            if let Ok(key) = <[u8; 32]>::try_from(key.value()) {
                map.insert(node.value().to_owned(), key);
            }
        }
        Ok(Self(RwLock::new(map)))
    }
}

/// Reads a sealing key as `join` sends it: base64 of 32 bytes.
pub fn parse_sealing_key(text: &str) -> Result<[u8; 32], String> {
    if text.len() > 64 {
        return Err(format!(
            "sealingKey: {} characters, expected the base64 of 32 bytes",
            text.len()
        ));
    }
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| format!("sealingKey: not base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("sealingKey: {} bytes, expected 32", bytes.len()))
}

impl Identity {
    /// Stores `node`'s sealing public key, replacing any earlier one. Blocking.
    pub fn set_sealing_key(&self, node: &str, key: [u8; 32]) -> Result<(), IdentityError> {
        let tx = self.db.begin_write().map_err(db_err("begin"))?;
        {
            let mut table = tx.open_table(SEALING_KEYS).map_err(db_err("open table"))?;
            table.insert(node, &key[..]).map_err(db_err("insert"))?;
        }
        tx.commit().map_err(db_err("commit"))?;
        let mut map = self
            .sealing_keys
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(node.to_owned(), key);
        Ok(())
    }

    /// `node`'s sealing public key, if it sent one. Memory only.
    pub fn sealing_key(&self, node: &str) -> Option<[u8; 32]> {
        let map = self
            .sealing_keys
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(node).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_per_node_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::open(dir.path(), false).unwrap();
        assert_eq!(id.sealing_key("dev-a"), None);
        id.set_sealing_key("dev-a", [1; 32]).unwrap();
        id.set_sealing_key("dev-a", [2; 32]).unwrap();
        id.set_sealing_key("dev-b", [3; 32]).unwrap();
        drop(id);
        let id = Identity::open(dir.path(), false).unwrap();
        assert_eq!(id.sealing_key("dev-a"), Some([2; 32]));
        assert_eq!(id.sealing_key("dev-b"), Some([3; 32]));
        assert_eq!(id.sealing_key("dev-c"), None);
    }

    #[test]
    fn parses_only_32_byte_keys() {
        assert_eq!(parse_sealing_key(&STANDARD.encode([7u8; 32])), Ok([7; 32]));
        assert_eq!(
            parse_sealing_key(&STANDARD.encode([7u8; 31])),
            Err("sealingKey: 31 bytes, expected 32".into())
        );
        assert!(parse_sealing_key("!!").is_err());
        assert!(parse_sealing_key(&"A".repeat(100)).is_err());
    }
}

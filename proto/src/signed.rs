//! Controller → agent: the envelope a desired state travels in on the
//! `desired` topic. The controller signs `SIGNED_DESIRED_CONTEXT` followed by
//! the `DesiredState` frame with its ed25519 key; the agent checks that
//! signature against the key it pinned at enrollment before it even decodes
//! the payload, so a broker (or anyone who can publish there) cannot make a
//! device run anything. The context string keeps a signature made for a
//! desired state from ever being valid for another kind of signed message.

use alloc::vec::Vec;
use core::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::Message;
use crate::desired::DesiredState;

/// Bytes signed before the payload (domain separation).
pub const SIGNED_DESIRED_CONTEXT: &[u8] = b"flotilla desired state v1\0";

/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A signed desired state, as published retained on `…/node/{node}/desired`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDesired {
    /// The `DesiredState` frame (version byte and postcard), exactly as signed.
    pub payload: Vec<u8>,
    /// ed25519 signature of `SIGNED_DESIRED_CONTEXT ++ payload`.
    pub signature: Signature,
}

impl SignedDesired {
    /// The bytes the signature covers.
    pub fn signed_bytes(payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(SIGNED_DESIRED_CONTEXT.len() + payload.len());
        bytes.extend_from_slice(SIGNED_DESIRED_CONTEXT);
        bytes.extend_from_slice(payload);
        bytes
    }
}

impl Message for SignedDesired {
    // The payload, its length prefix and the signature.
    const MAX_BYTES: usize = DesiredState::MAX_BYTES + 16 + SIGNATURE_LEN;
    // Named like what it carries: refusals read "desired state: …".
    const NAME: &'static str = "desired state";
}

/// An ed25519 signature: 64 bytes on the wire, with no length prefix.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signature(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

// serde implements arrays only up to 32 elements; a fixed-size tuple keeps
// the encoding at exactly 64 bytes.
impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(SIGNATURE_LEN)?;
        for b in &self.0 {
            tuple.serialize_element(b)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{SIGNATURE_LEN} signature bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Signature, A::Error> {
                let mut out = [0u8; SIGNATURE_LEN];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                Ok(Signature(out))
            }
        }
        deserializer.deserialize_tuple(SIGNATURE_LEN, Bytes)
    }
}

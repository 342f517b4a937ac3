//! The frame every payload travels in: one format-version byte, then the
//! postcard body. Sizes are capped before anything is decoded, and decoding
//! bad bytes returns an error — it never panics.

use alloc::vec::Vec;
use core::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The wire format version this build writes and reads.
pub const WIRE_VERSION: u8 = 1;

/// A message type that crosses the wire, with the largest frame accepted for it.
pub trait Message: Serialize + DeserializeOwned {
    /// Largest encoded frame (version byte included) that is encoded or decoded.
    const MAX_BYTES: usize;
    /// Name used in error messages.
    const NAME: &'static str;
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoded frame is larger than the message type allows.
    TooLarge {
        message: &'static str,
        len: usize,
        max: usize,
    },
    /// The serializer failed (it does not for the types of this crate).
    Serialize(postcard::Error),
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload has no bytes at all.
    Empty { message: &'static str },
    /// The payload is larger than the message type allows; nothing was decoded.
    TooLarge {
        message: &'static str,
        len: usize,
        max: usize,
    },
    /// The version byte names a format this build does not read.
    UnsupportedVersion { message: &'static str, version: u8 },
    /// The body is not a valid postcard encoding of the message.
    Malformed {
        message: &'static str,
        error: postcard::Error,
    },
    /// A valid message was followed by extra bytes.
    TrailingBytes { message: &'static str, count: usize },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { message, len, max } => {
                write!(
                    f,
                    "{message}: encoded size {len} bytes exceeds the limit of {max} bytes"
                )
            }
            Self::Serialize(e) => write!(f, "encoding failed: {e}"),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty { message } => write!(f, "{message}: empty payload"),
            Self::TooLarge { message, len, max } => {
                write!(
                    f,
                    "{message}: payload of {len} bytes exceeds the limit of {max} bytes"
                )
            }
            Self::UnsupportedVersion { message, version } => write!(
                f,
                "{message}: wire format version {version} is not supported (expected {WIRE_VERSION})"
            ),
            Self::Malformed { message, error } => write!(f, "{message}: malformed body: {error}"),
            Self::TrailingBytes { message, count } => {
                write!(f, "{message}: {count} unexpected bytes after the message")
            }
        }
    }
}

impl core::error::Error for EncodeError {}
impl core::error::Error for DecodeError {}

/// Encodes `msg` as a frame: version byte, then postcard.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, EncodeError> {
    let mut frame = Vec::with_capacity(64);
    frame.push(WIRE_VERSION);
    let frame = postcard::to_extend(msg, frame).map_err(EncodeError::Serialize)?;
    if frame.len() > M::MAX_BYTES {
        return Err(EncodeError::TooLarge {
            message: M::NAME,
            len: frame.len(),
            max: M::MAX_BYTES,
        });
    }
    Ok(frame)
}

/// Decodes a frame made by [`encode`]. The size cap is checked first.
pub fn decode<M: Message>(frame: &[u8]) -> Result<M, DecodeError> {
    let message = M::NAME;
    if frame.len() > M::MAX_BYTES {
        return Err(DecodeError::TooLarge {
            message,
            len: frame.len(),
            max: M::MAX_BYTES,
        });
    }
    let (&version, body) = frame.split_first().ok_or(DecodeError::Empty { message })?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion { message, version });
    }
    let (msg, rest) = postcard::take_from_bytes::<M>(body)
        .map_err(|error| DecodeError::Malformed { message, error })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            message,
            count: rest.len(),
        });
    }
    Ok(msg)
}

//! Checksums: the CRC of each part and of the whole object, in the form S3
//! expects in `x-amz-checksum-*` headers.
//!
//! putonly computes every checksum itself, from the bytes it read, and sends
//! it as a header the server verifies. Parts are checksummed independently
//! (they are read in parallel) and their CRCs are combined into the
//! full-object CRC, which CompleteMultipartUpload asks the server to verify
//! (checksum type FULL_OBJECT). This module is pure computation: no I/O.

use std::fmt;

use base64::Engine as _;
use crc_fast::CrcAlgorithm;

/// The checksum every part and every object carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumKind {
    Crc64Nvme,
    Crc32C,
    Crc32,
}

impl ChecksumKind {
    pub const NAMES: &'static str = "crc64nvme, crc32c, crc32";

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().replace('-', "").as_str() {
            "crc64nvme" => Some(Self::Crc64Nvme),
            "crc32c" => Some(Self::Crc32C),
            "crc32" => Some(Self::Crc32),
            _ => None,
        }
    }
}

impl fmt::Display for ChecksumKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Crc64Nvme => "crc64nvme",
            Self::Crc32C => "crc32c",
            Self::Crc32 => "crc32",
        })
    }
}

/// The CRC of one contiguous run of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crc {
    pub kind: ChecksumKind,
    pub value: u64,
    pub len: u64,
}

fn algorithm(kind: ChecksumKind) -> CrcAlgorithm {
    match kind {
        ChecksumKind::Crc64Nvme => CrcAlgorithm::Crc64Nvme,
        ChecksumKind::Crc32C => CrcAlgorithm::Crc32Iscsi,
        ChecksumKind::Crc32 => CrcAlgorithm::Crc32IsoHdlc,
    }
}

impl Crc {
    /// The CRC of `data`.
    pub fn of(kind: ChecksumKind, data: &[u8]) -> Self {
        Crc {
            kind,
            value: crc_fast::checksum(algorithm(kind), data),
            len: data.len() as u64,
        }
    }

    /// The CRC of nothing: the start of a combination.
    pub fn empty(kind: ChecksumKind) -> Self {
        Self::of(kind, &[])
    }

    /// The CRC of `self`'s bytes followed by `next`'s bytes.
    pub fn then(self, next: Crc) -> Crc {
        debug_assert_eq!(self.kind, next.kind);
        Crc {
            kind: self.kind,
            value: crc_fast::checksum_combine(
                algorithm(self.kind),
                self.value,
                next.value,
                next.len,
            ),
            len: self.len + next.len,
        }
    }

    /// Combines part CRCs, in part order, into the whole object's CRC.
    pub fn combine(kind: ChecksumKind, parts: impl IntoIterator<Item = Crc>) -> Crc {
        parts.into_iter().fold(Crc::empty(kind), Crc::then)
    }

    /// Base64 of the big-endian bytes, as in `x-amz-checksum-*` headers.
    pub fn to_base64(&self) -> String {
        let engine = base64::engine::general_purpose::STANDARD;
        match self.kind {
            ChecksumKind::Crc64Nvme => engine.encode(self.value.to_be_bytes()),
            ChecksumKind::Crc32C | ChecksumKind::Crc32 => {
                engine.encode((self.value as u32).to_be_bytes())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // The check values of the catalogue, for "123456789".
        assert_eq!(Crc::of(ChecksumKind::Crc32, b"123456789").value, 0xCBF43926);
        assert_eq!(
            Crc::of(ChecksumKind::Crc32C, b"123456789").value,
            0xE3069283
        );
        assert_eq!(
            Crc::of(ChecksumKind::Crc64Nvme, b"123456789").value,
            0xAE8B14860A799888
        );
        // S3's documented form: base64 of the big-endian value.
        assert_eq!(Crc::of(ChecksumKind::Crc32, b"").to_base64(), "AAAAAA==");
    }

    #[test]
    fn combined_parts_equal_the_whole() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for kind in [
            ChecksumKind::Crc64Nvme,
            ChecksumKind::Crc32C,
            ChecksumKind::Crc32,
        ] {
            let whole = Crc::of(kind, &data);
            let parts = data.chunks(7_777).map(|c| Crc::of(kind, c));
            assert_eq!(Crc::combine(kind, parts), whole, "{kind}");
        }
    }
}

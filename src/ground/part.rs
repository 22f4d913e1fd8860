//! A part the server accepted, and a multipart upload that may be
//! continued: what the bucket answers, the upload sends and the journal
//! keeps.

use crate::ground::checksum::{ChecksumKind, Crc};

/// A part that the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartDone {
    pub number: i32,
    pub etag: String,
    pub crc: Crc,
}

/// A multipart upload that was started and may be continued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub upload_id: String,
    pub part_size: u64,
    pub checksum: ChecksumKind,
    pub parts: Vec<PartDone>,
}

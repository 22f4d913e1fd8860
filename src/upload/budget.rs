//! What the upload engine may hold at once: bytes of request bodies in
//! memory (`part_size × concurrency`), requests in flight
//! (`requests_in_flight`), and the buffers kept for the next bodies (128 KiB
//! and up, by size class, never more idle than the budget leaves free).
//!
//! Memory is bounded by bytes, not by a count of files: a small file takes
//! 64 KiB of the budget, so hundreds of small files go at once within the
//! memory a few large parts take, and a separate cap keeps the requests in
//! flight (connections, descriptors, server load) in check. Both waits are
//! first come, first served, so a large part is never starved by a stream
//! of small files. This module never reads files or talks to S3; it only
//! says when a request may start and which buffer it reads into.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::config::UploadSettings;

/// Budget is counted in KiB so that any part (up to 5 GiB) fits the
/// semaphore's `u32` acquire.
const UNIT: u64 = 1024;

/// Bodies smaller than this are allocated exactly (from the heap); larger
/// ones come from the pool, since the allocator maps (and the kernel faults
/// in, page by page) every buffer above it (see `main.rs`).
const MIN_POOLED: u64 = 128 * 1024;

/// The limits shared by every upload of one engine.
pub struct Budget {
    memory: Arc<Semaphore>,
    memory_units: u32,
    requests: Arc<Semaphore>,
    /// Buffers for reuse, by size class: reading a body into a buffer used
    /// before costs no new mapping and no page faults.
    pool: Mutex<Pool>,
    part_size: u64,
}

#[derive(Default)]
struct Pool {
    /// Size class → idle buffers of exactly that capacity, and since when.
    idle: BTreeMap<u64, Vec<(BytesMut, Instant)>>,
    /// Bytes held by idle buffers.
    bytes: u64,
}

/// One request's share: its bytes of memory and its place among the
/// requests in flight, released on drop.
pub struct Admission {
    _memory: OwnedSemaphorePermit,
    _request: OwnedSemaphorePermit,
}

/// A buffer for a request body: from the pool (charged its size class), or
/// exactly the size asked for.
pub enum Buffer {
    Pooled(BytesMut),
    Exact(BytesMut),
}

impl Buffer {
    pub fn into_inner(self) -> BytesMut {
        match self {
            Buffer::Pooled(b) | Buffer::Exact(b) => b,
        }
    }
}

impl Budget {
    pub fn new(settings: &UploadSettings) -> Budget {
        let part_units = settings.part_size.div_ceil(UNIT).max(1);
        let units = part_units
            .saturating_mul(settings.concurrency.max(1) as u64)
            .min(u32::MAX as u64) as u32;
        Budget {
            memory: Arc::new(Semaphore::new(units as usize)),
            memory_units: units,
            requests: Arc::new(Semaphore::new(settings.requests_in_flight.max(1))),
            pool: Mutex::new(Pool::default()),
            part_size: settings.part_size,
        }
    }

    /// Waits until a request with a body of `bytes` may start: a place
    /// among the requests first, then its memory (so memory is never held
    /// by a request still waiting for its turn). A body larger than the
    /// whole budget takes all of it. Idle buffers are freed as far as the
    /// memory admitted now leaves no room for them.
    pub async fn admit(&self, bytes: u64) -> Result<Admission, AcquireError> {
        let request = self.requests.clone().acquire_owned().await?;
        let memory = self
            .memory
            .clone()
            .acquire_many_owned(self.units(bytes))
            .await?;
        self.trim_to_free();
        Ok(Admission {
            _memory: memory,
            _request: request,
        })
    }

    fn units(&self, bytes: u64) -> u32 {
        bytes
            .div_ceil(UNIT)
            .clamp(1, self.memory_units.max(1) as u64) as u32
    }

    /// The size class a body of `len` bytes is read into: the next power
    /// of two (at most twice the body), or the part size for a part; none
    /// for small bodies and for parts grown past the part size.
    fn class(&self, len: u64) -> Option<u64> {
        if len < MIN_POOLED || len > self.part_size {
            return None;
        }
        Some(len.next_power_of_two().min(self.part_size))
    }

    /// How many bytes `admit` must be asked for a body of `len` bytes read
    /// into the buffer [`Budget::buffer`] gives: a pooled buffer counts
    /// whole, whatever part of it is used.
    pub fn charge(&self, len: u64) -> u64 {
        self.class(len).unwrap_or(len)
    }

    /// A buffer for a body of `len` bytes, once admitted for
    /// [`Budget::charge`]`(len)`. Idle buffers of other sizes are freed
    /// first if keeping them would take the memory past the budget.
    pub fn buffer(&self, len: u64) -> Buffer {
        let Some(class) = self.class(len) else {
            return Buffer::Exact(BytesMut::new());
        };
        let mut pool = self.lock();
        if let Some((buf, _)) = pool.idle.get_mut(&class).and_then(Vec::pop) {
            pool.bytes -= class;
            return Buffer::Pooled(buf);
        }
        drop(pool);
        Buffer::Pooled(BytesMut::with_capacity(class as usize))
    }

    /// Idle buffers and the bodies in flight stay within the budget: what
    /// is not admitted now is all the idle buffers may hold.
    fn trim_to_free(&self) {
        let free = self.memory.available_permits() as u64 * UNIT;
        let mut pool = self.lock();
        while pool.bytes > free {
            let Some((&size, list)) = pool.idle.iter_mut().rev().find(|(_, v)| !v.is_empty())
            else {
                break;
            };
            list.pop();
            pool.bytes -= size;
        }
    }

    /// Takes a pooled buffer back once its request (and every retry) is
    /// over, while its admission is still held; a body still held elsewhere
    /// is left to be freed there. It is kept only if the idle buffers stay
    /// within the memory not admitted now plus its own share.
    pub fn give_back(&self, body: Bytes) {
        let Ok(buf) = body.try_into_mut() else {
            return;
        };
        let cap = buf.capacity() as u64;
        if self.class(cap) != Some(cap) {
            return;
        }
        let free = self.memory.available_permits() as u64 * UNIT;
        let budget = self.memory_units as u64 * UNIT;
        let mut pool = self.lock();
        if pool.bytes <= free && pool.bytes + cap <= budget {
            pool.bytes += cap;
            pool.idle
                .entry(cap)
                .or_default()
                .push((buf, Instant::now()));
        }
    }

    /// Frees the buffers no body has used for `idle`, so an agent that is
    /// quiet holds no part memory.
    pub fn release_idle(&self, idle: Duration) -> usize {
        let mut pool = self.lock();
        let mut freed = 0;
        let mut bytes = 0;
        for (size, list) in pool.idle.iter_mut() {
            let before = list.len();
            list.retain(|(_, at)| at.elapsed() < idle);
            freed += before - list.len();
            bytes += *size * list.len() as u64;
        }
        pool.bytes = bytes;
        freed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
impl Budget {
    pub fn pooled(&self) -> usize {
        self.lock().idle.values().map(Vec::len).sum()
    }

    fn pooled_bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn settings(concurrency: usize, requests: usize) -> UploadSettings {
        UploadSettings {
            part_size: 8 * MIB,
            concurrency,
            requests_in_flight: requests,
            ..UploadSettings::default()
        }
    }

    #[tokio::test]
    async fn small_bodies_share_the_memory_of_one_part_and_requests_are_capped() {
        let budget = Arc::new(Budget::new(&settings(1, 100)));
        // 8 MiB of budget holds a hundred 4 KiB bodies at once...
        let mut held = Vec::new();
        for _ in 0..100 {
            held.push(budget.admit(budget.charge(4096)).await.unwrap());
        }
        // ...but not a 101st request: the request cap holds it.
        let waiting = {
            let b = budget.clone();
            tokio::spawn(async move { b.admit(4096).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        held.pop();
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_part_waits_for_memory_and_small_files_queue_behind_it() {
        let budget = Arc::new(Budget::new(&settings(2, 64)));
        let a = budget.admit(budget.charge(8 * MIB)).await.unwrap();
        let b = budget.admit(budget.charge(5 * MIB)).await.unwrap();
        // A third part does not fit; a small file behind it waits its turn
        // (first come, first served), so parts are never starved.
        let part = {
            let b = budget.clone();
            tokio::spawn(async move { b.admit(8 * MIB).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let small = {
            let b = budget.clone();
            tokio::spawn(async move { b.admit(4096).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!part.is_finished() && !small.is_finished());
        drop(a);
        part.await.unwrap().unwrap();
        small.await.unwrap().unwrap();
        drop(b);
        // A body larger than the whole budget takes all of it, not forever.
        budget.admit(100 * MIB).await.unwrap();
    }

    #[test]
    fn bodies_are_pooled_by_size_class_within_the_budget() {
        let budget = Budget::new(&settings(2, 64));
        // Small bodies: exact, charged their size.
        assert_eq!(budget.charge(4096), 4096);
        assert!(matches!(budget.buffer(4096), Buffer::Exact(_)));
        // Larger ones: the next power of two, at most the part size.
        assert_eq!(budget.charge(1_000_000), MIB);
        assert_eq!(budget.charge(6 * MIB), 8 * MIB);
        assert_eq!(budget.charge(8 * MIB), 8 * MIB);
        // A part grown past the part size is exact.
        assert_eq!(budget.charge(9 * MIB), 9 * MIB);
        assert!(matches!(budget.buffer(9 * MIB), Buffer::Exact(_)));
        match budget.buffer(MIB - 5) {
            Buffer::Pooled(b) => assert_eq!(b.capacity() as u64, MIB),
            Buffer::Exact(_) => panic!("a 1 MiB body is pooled"),
        }
        // Idle buffers never hold more than the budget (16 MiB here).
        for _ in 0..3 {
            budget.give_back(Bytes::from(BytesMut::with_capacity(8 * MIB as usize)));
        }
        assert_eq!(budget.pooled(), 2);
        // Held elsewhere (a retry still has it): not taken back.
        let budget = Budget::new(&settings(2, 64));
        let body = Bytes::from(vec![0u8; 8 * MIB as usize]);
        let other = body.clone();
        budget.give_back(body);
        assert_eq!(budget.pooled(), 0);
        drop(other);
        // Sizes that are no class are freed, not kept.
        budget.give_back(Bytes::from(vec![0u8; 16 * MIB as usize]));
        budget.give_back(Bytes::from(vec![0u8; 3 * MIB as usize]));
        budget.give_back(Bytes::from(vec![0u8; 4096]));
        assert_eq!(budget.pooled(), 0);
    }

    #[tokio::test]
    async fn idle_buffers_of_another_size_make_room_for_a_new_one() {
        let budget = Budget::new(&settings(2, 64));
        for _ in 0..16 {
            budget.give_back(Bytes::from(BytesMut::with_capacity(MIB as usize)));
        }
        assert_eq!(budget.pooled(), 16, "16 MiB of idle 1 MiB buffers");
        // An 8 MiB part admitted: idle buffers may keep only what is not
        // admitted (8 MiB), so half of them are freed.
        let _a = budget.admit(budget.charge(8 * MIB)).await.unwrap();
        match budget.buffer(8 * MIB) {
            Buffer::Pooled(b) => assert_eq!(b.capacity() as u64, 8 * MIB),
            Buffer::Exact(_) => panic!("a part is pooled"),
        }
        assert_eq!(budget.pooled(), 8);
    }

    #[tokio::test]
    async fn idle_part_buffers_give_way_to_a_burst_of_small_bodies() {
        let budget = Budget::new(&settings(2, 1024));
        for _ in 0..2 {
            budget.give_back(Bytes::from(BytesMut::with_capacity(8 * MIB as usize)));
        }
        assert_eq!(
            budget.pooled_bytes(),
            16 * MIB,
            "a full pool after a big file"
        );
        let mut held = Vec::new();
        let mut admitted = 0;
        for _ in 0..163 {
            held.push(budget.admit(budget.charge(100 * 1024)).await.unwrap());
            admitted += 100 * 1024;
            assert!(
                budget.pooled_bytes() + admitted <= 16 * MIB,
                "{} idle + {admitted} admitted",
                budget.pooled_bytes()
            );
        }
        assert_eq!(budget.pooled(), 0);
    }

    #[test]
    fn idle_buffers_are_released() {
        let budget = Budget::new(&settings(4, 64));
        budget.give_back(Bytes::from(BytesMut::with_capacity(8 * MIB as usize)));
        assert_eq!(budget.release_idle(Duration::from_secs(60)), 0);
        assert_eq!(budget.release_idle(Duration::ZERO), 1);
        assert_eq!(budget.pooled(), 0);
    }
}

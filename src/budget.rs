//! What the upload engine may hold at once: bytes of request bodies in
//! memory (`part_size × concurrency`), requests in flight
//! (`requests_in_flight`), and the part buffers kept for the next parts.
//!
//! Memory is bounded by bytes, not by a count of files: a 4 KiB file takes
//! 4 KiB of the budget, so hundreds of small files go at once within the
//! memory a few large parts take, and a separate cap keeps the requests in
//! flight (connections, descriptors, server load) in check. Both waits are
//! first come, first served, so a large part is never starved by a stream
//! of small files. This module never reads files or talks to S3; it only
//! says when a request may start and which buffer it reads into.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::config::UploadSettings;

/// Budget is counted in KiB so that any part (up to 5 GiB) fits the
/// semaphore's `u32` acquire.
const UNIT: u64 = 1024;

/// The limits shared by every upload of one engine.
pub struct Budget {
    memory: Arc<Semaphore>,
    memory_units: u32,
    requests: Arc<Semaphore>,
    /// Part buffers for reuse: reading a part into a buffer used before
    /// costs no new mapping and no page faults.
    pool: Mutex<Vec<(BytesMut, Instant)>>,
    /// Buffers kept at most: as many as parts of `part_size` fit the budget.
    pool_max: usize,
    /// Only buffers of at most this capacity are kept (a part grown for a
    /// file over 10,000 parts is freed, not kept beyond the budget).
    pool_capacity: usize,
}

/// One request's share: its bytes of memory and its place among the
/// requests in flight, released on drop.
pub struct Admission {
    _memory: OwnedSemaphorePermit,
    _request: OwnedSemaphorePermit,
}

/// A buffer for a request body: taken from the pool (and charged a whole
/// part), or exactly the size asked for.
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
            pool: Mutex::new(Vec::new()),
            pool_max: settings.concurrency.max(1),
            pool_capacity: usize::try_from(settings.part_size).unwrap_or(usize::MAX),
        }
    }

    /// Waits until a request with a body of `bytes` may start. A body
    /// larger than the whole budget takes all of it.
    pub async fn admit(&self, bytes: u64) -> Result<Admission, AcquireError> {
        let units = bytes
            .div_ceil(UNIT)
            .clamp(1, self.memory_units.max(1) as u64) as u32;
        let memory = self.memory.clone().acquire_many_owned(units).await?;
        let request = self.requests.clone().acquire_owned().await?;
        Ok(Admission {
            _memory: memory,
            _request: request,
        })
    }

    /// How many bytes `admit` must be asked for a body of `len` bytes read
    /// into the buffer [`Budget::buffer`] gives: a pooled buffer counts as
    /// a whole part, whatever part of it is used.
    pub fn charge(&self, len: u64) -> u64 {
        if self.pools(len) {
            self.pool_capacity as u64
        } else {
            len
        }
    }

    /// Whether a body of `len` bytes is read into a pooled buffer: parts
    /// near the part size are; small files get a buffer of their own size
    /// (a pooled part buffer would hold megabytes for a few bytes).
    fn pools(&self, len: u64) -> bool {
        let cap = self.pool_capacity as u64;
        len <= cap && len >= cap / 2
    }

    /// A buffer for a body of `len` bytes (see [`Budget::charge`]).
    pub fn buffer(&self, len: u64) -> Buffer {
        if !self.pools(len) {
            return Buffer::Exact(BytesMut::new());
        }
        let used = self.lock().pop().map(|(b, _)| b).unwrap_or_default();
        Buffer::Pooled(used)
    }

    /// Takes a pooled buffer back once its request (and every retry) is
    /// over; a body still held elsewhere is left to be freed there.
    pub fn give_back(&self, body: Bytes) {
        let Ok(buf) = body.try_into_mut() else {
            return;
        };
        if buf.capacity() > self.pool_capacity || buf.capacity() < self.pool_capacity / 2 {
            return;
        }
        let mut pool = self.lock();
        if pool.len() < self.pool_max {
            pool.push((buf, Instant::now()));
        }
    }

    /// Frees the buffers no part has used for `idle`, so an agent that is
    /// quiet holds no part memory.
    pub fn release_idle(&self, idle: Duration) -> usize {
        let mut pool = self.lock();
        let before = pool.len();
        pool.retain(|(_, at)| at.elapsed() < idle);
        before - pool.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(BytesMut, Instant)>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub fn pooled(&self) -> usize {
        self.lock().len()
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
    fn only_part_sized_buffers_are_pooled_and_no_more_than_fit_the_budget() {
        let budget = Budget::new(&settings(2, 64));
        assert_eq!(budget.charge(4096), 4096);
        assert_eq!(budget.charge(6 * MIB), 8 * MIB);
        assert!(matches!(budget.buffer(4096), Buffer::Exact(_)));
        for _ in 0..3 {
            budget.give_back(Bytes::from(vec![0u8; 8 * MIB as usize]));
        }
        assert_eq!(budget.pooled(), 2, "at most concurrency buffers kept");
        // Held elsewhere (a retry still has it): not taken back.
        let body = Bytes::from(vec![0u8; 8 * MIB as usize]);
        let other = body.clone();
        budget.give_back(body);
        drop(other);
        // Grown parts and small bodies are freed, not kept.
        let budget = Budget::new(&settings(2, 64));
        budget.give_back(Bytes::from(vec![0u8; 16 * MIB as usize]));
        budget.give_back(Bytes::from(vec![0u8; 4096]));
        assert_eq!(budget.pooled(), 0);
        match budget.buffer(8 * MIB) {
            Buffer::Pooled(b) => assert_eq!(b.capacity(), 0, "a new buffer when none is kept"),
            Buffer::Exact(_) => panic!("a part-sized body is pooled"),
        }
    }

    #[test]
    fn idle_buffers_are_released() {
        let budget = Budget::new(&settings(4, 64));
        budget.give_back(Bytes::from(vec![0u8; 8 * MIB as usize]));
        assert_eq!(budget.release_idle(Duration::from_secs(60)), 0);
        assert_eq!(budget.release_idle(Duration::ZERO), 1);
        assert_eq!(budget.pooled(), 0);
    }
}

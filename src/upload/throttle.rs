//! Bandwidth limit: a token bucket shared by every upload of a process.
//!
//! Bytes are taken from the bucket as parts are read from disk, before they
//! are sent, so the average rate of everything in flight stays under the
//! limit; a burst is at most one chunk. This module only paces; it never
//! reads, buffers or sends data itself.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The most bytes one token request asks for; also the burst size.
const CHUNK: u32 = 64 * 1024;

#[derive(Debug)]
pub struct Throttle {
    limiter: DefaultDirectRateLimiter,
    chunk: NonZeroU32,
}

impl Throttle {
    /// A limit of `bytes_per_second` (at least 1 KiB/s, checked by config).
    pub fn new(bytes_per_second: u64) -> Self {
        let rate = NonZeroU32::new(u32::try_from(bytes_per_second).unwrap_or(u32::MAX).max(1))
            .unwrap_or(NonZeroU32::MIN);
        // A tenth of a second's worth, within [1 KiB, CHUNK].
        let burst = (rate.get() / 10).clamp(1024, CHUNK);
        let chunk = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Throttle {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(chunk)),
            chunk,
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, mut bytes: u64) {
        while bytes > 0 {
            let n = bytes.min(u64::from(self.chunk.get()));
            // n <= chunk == burst, so capacity is always sufficient.
            let cells = NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN);
            let _ = self.limiter.until_n_ready(cells).await;
            bytes -= n;
        }
    }
}

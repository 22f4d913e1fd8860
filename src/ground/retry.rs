//! Backoff: how long to wait before trying again, shared by the upload
//! engine and the credential renewal.
//!
//! Exponential with full jitter and a cap, so that many workers failing
//! together do not come back together. This module only computes delays; it
//! never decides whether an error is worth retrying (the S3 layer's error
//! kinds do) and never sleeps itself.

use std::time::Duration;

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The delay before retry number `attempt` (1 for the first retry): a
    /// random duration between half and all of `min(cap, base * 2^(attempt-1))`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.cap);
        let half = exp / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_stays_capped() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..100 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d4 = b.delay(4);
            assert!(d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800));
            let d40 = b.delay(40);
            assert!(d40 >= Duration::from_millis(2500) && d40 <= Duration::from_secs(5));
        }
    }
}

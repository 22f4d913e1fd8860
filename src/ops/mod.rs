//! Operations: what the agent shows the people who run it, and the
//! documents the people who set it up hand over. [`metrics`] owns the metric
//! names, the health rule and the `/metrics` + `/healthz` listener;
//! [`policy`] generates and lints the IAM documents (the bucket policy, the
//! role's trust and permissions) from the settings.
//!
//! Neither ever blocks the upload path nor talks to the bucket; this module
//! names only the ground and the settings.

pub mod metrics;
pub mod policy;

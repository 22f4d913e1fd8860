//! End-to-end tests: the real `putonly` binary against real servers (moto
//! with IAM authorization on, Garage), through the recording proxy.

mod garage;
mod push;
mod support;

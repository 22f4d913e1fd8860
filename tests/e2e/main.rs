//! End-to-end tests: the real `putonly` binary against real servers (moto
//! with IAM authorization on, Garage), through the recording proxy.

mod agent;
mod attackers;
mod batches;
mod bench;
mod check;
mod faults;
mod garage;
mod hardening;
mod hostile;
mod longrun;
mod no_overwrite;
mod packaging;
mod policy;
mod producers;
mod push;
mod receipts;
mod resources;
mod shapes;
mod siege;
mod stream;
mod support;

//! The floor under putonly's small-file rate: the AWS SDK alone sending
//! PutObject requests from memory, configured as putonly configures it
//! (path-style addressing, the SDK's checksums and retries off, a
//! CRC64NVME header computed per request, unsigned payload, the SDK's
//! connection pool with TCP keepalive), `--in-flight` at once, each object
//! with its own random bytes. No file is opened, no journal written,
//! nothing checked: what is left is the SDK's request path and the TCP it
//! sends on. It reads nothing from the server.
//!
//! `bench/peers.sh --floor` runs it beside the tools against the same
//! target; alone:
//!
//! ```sh
//! cargo run --release --example sdk-floor -- --endpoint-url http://127.0.0.1:PORT \
//!     --count 10000 --size 4096 [--in-flight 64] [--prefix floor/]
//! ```
//!
//! Credentials and region come from the usual AWS environment (profile,
//! shared files). Exit status 0 when every request succeeded.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_types::retry::RetryConfig;
use base64::Engine as _;
use bytes::Bytes;

struct Args {
    endpoint: String,
    bucket: String,
    prefix: String,
    count: usize,
    size: usize,
    in_flight: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        endpoint: String::new(),
        bucket: "account-b-bucket".into(),
        prefix: "floor/".into(),
        count: 1000,
        size: 4096,
        in_flight: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--endpoint-url" => a.endpoint = value()?,
            "--bucket" => a.bucket = value()?,
            "--prefix" => a.prefix = value()?,
            "--count" => a.count = number(value()?)?,
            "--size" => a.size = number(value()?)?,
            "--in-flight" => a.in_flight = number(value()?)?.max(1),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.endpoint.is_empty() {
        return Err("--endpoint-url is required".into());
    }
    Ok(a)
}

async fn run(a: Args) -> Result<(), String> {
    // putonly's own HTTP client: the SDK's connection pool, TCP keepalive.
    let http = putonly::credentials::http_client().ok_or("cannot build the HTTP client")?;
    let sdk = aws_config::from_env()
        .endpoint_url(&a.endpoint)
        .http_client(http)
        .load()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(RetryConfig::disabled())
        .build();
    let client = aws_sdk_s3::Client::from_conf(conf);
    // Every object its own bytes (a store that keeps each distinct block
    // once, as Garage does, would otherwise write one block in all): body
    // i is the window of `size` bytes at 8 × i in one random buffer.
    let stride: usize = 8;
    let len = stride
        .checked_mul(a.count)
        .and_then(|n| n.checked_add(a.size))
        .filter(|&n| n <= 1 << 34)
        .ok_or("--count and --size ask for more than 16 GiB of data")?;
    let mut noise = vec![0u8; len];
    fastrand::fill(&mut noise);
    let noise = Bytes::from(noise);
    let slots = Arc::new(tokio::sync::Semaphore::new(a.in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..a.count {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let client = client.clone();
        let body = noise.slice(stride * i..stride * i + a.size);
        let (bucket, key) = (a.bucket.clone(), format!("{}f{i:06}", a.prefix));
        tasks.spawn(async move {
            // Computed per request, as putonly computes it while reading.
            let crc = base64::engine::general_purpose::STANDARD
                .encode(crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &body).to_be_bytes());
            let sent = client
                .put_object()
                .bucket(bucket)
                .key(&key)
                .content_length(body.len() as i64)
                .checksum_crc64_nvme(crc)
                .body(ByteStream::from(body))
                .customize()
                .disable_payload_signing()
                .send()
                .await;
            drop(permit);
            sent.map(|_| ())
                .map_err(|e| format!("{key}: {}", aws_sdk_s3::error::DisplayErrorContext(e)))
        });
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| e.to_string())??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    let took = started.elapsed().as_secs_f64();
    eprintln!(
        "sdk-floor: {} PutObject of {} bytes, {} in flight: {:.2} s, {:.0} requests/s",
        a.count,
        a.size,
        a.in_flight,
        took,
        a.count as f64 / took
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sdk-floor: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sdk-floor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sdk-floor: {e}");
            ExitCode::FAILURE
        }
    }
}

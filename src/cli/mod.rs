//! The command line: argument definitions, logging set-up, and dispatch to
//! each subcommand. Flags are parsed into raw values here and merged into the
//! configuration once ([`AwsFlags::apply`], [`ExternalIdFlags::apply`]); the
//! subcommands receive checked settings. This module never talks to S3
//! itself, and never shows the external id (a [`Secret`]: `--help` hides
//! PUTONLY_EXTERNAL_ID's value).

// The flags' doc comments are their --help text, which names TOML tables
// (`[role]`, `[bucket]`...) as a user writes them: not links.
#![allow(rustdoc::broken_intra_doc_links)]

mod check;
mod policy;
mod push;
mod receipts;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{ConfigError, RawConfig, RawRole, Secret};

/// Exit status: everything asked for was done.
pub const EXIT_OK: u8 = 0;
/// Exit status: some files failed (the rest were uploaded).
pub const EXIT_FAILED: u8 = 1;
/// Exit status: usage or configuration error; nothing was sent.
pub const EXIT_USAGE: u8 = 2;

const ABOUT: &str = "Ship files into an S3 bucket you may only write to.";

const LONG_ABOUT: &str = "\
Ship files into an S3 bucket you may only write to.

putonly uploads files into someone else's bucket with write-only permissions: \
it assumes an IAM role with STS (renewing the temporary credentials before \
they expire), checks every key against the prefixes it is allowed to write, \
and sends only PutObject and multipart-upload requests. It never reads the \
bucket: no HeadObject, ListBucket, HeadBucket or CreateBucket, so it works \
where `aws s3 sync`, rclone or s5cmd are refused.

Every part and every object carries a CRC the server verifies, and a file \
that changes while it is read is not completed.";

const AFTER_HELP: &str = "\
Exit status: 0 when every file was uploaded, 1 when some failed, 2 for a \
usage or configuration error (nothing was sent), 130 when push was \
interrupted with Ctrl-C.

The standard AWS environment applies: AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE, \
AWS_CONFIG_FILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_REGION, \
AWS_ENDPOINT_URL. Settings in the configuration file and flags take precedence.

Logging: -v, -vv, or PUTONLY_LOG (a tracing filter, e.g. PUTONLY_LOG=debug).

Configuration reference: agent.toml.example; documentation: docs/.";

#[derive(Debug, Parser)]
#[command(
    name = "putonly",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// More log output on standard error (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload the named files and folders once, with progress.
    #[command(
        long_about = "\
Upload the named files and folders once, with progress, and exit.

A file goes to PREFIX + its file name (or to exactly --key). A folder's \
files go to PREFIX + their path relative to that folder, as `aws s3 cp \
--recursive` and `rclone copy` do: `putonly push --prefix foo/ data` sends \
data/a/b.csv to foo/a/b.csv. A symbolic link named on the command line is \
followed; links met inside a named folder are skipped and reported, unless \
--follow-links is given. FIFOs, sockets and devices are skipped with a warning.

Files up to the multipart threshold go in one PutObject; larger ones are \
streamed from disk as a multipart upload, parts in parallel, never whole in \
memory (peak memory is about part_size x concurrency). Small files go many \
at once within that memory, up to requests_in_flight requests. Throttling, server \
errors and network failures are retried with backoff; access denied and keys \
outside the allowed prefixes are not.

With --no-overwrite (or [bucket] overwrite = false) every object is written \
with If-None-Match: *: a key that already holds an object is left as it is \
and the file is reported as \"exists\" (exit 0 unless --fail-on-exists). \
Nothing is read to find out; `putonly check --probe-write` tells whether \
the server honours the header.

Everything the configuration file holds can be given as flags instead, so a \
one-shot push needs no file:

  putonly push --bucket account-b-bucket \\
      --role-arn arn:aws:iam::123456789012:role/account-a-s3-role \\
      --profile s3-test --prefix foo/ report.csv",
        after_long_help = AFTER_HELP
    )]
    Push(Box<PushArgs>),

    /// Run the agent: watch folders and upload every finished file.
    #[command(
        long_about = "\
Run the agent: watch the configured folders and upload every finished file, \
once, across restarts, crashes, network loss and credential renewals.

A file is taken once nothing changed for `settle` and no process has it \
open for writing, asked of the kernel with a read lease that is held until \
the file is sent (a writer opening it meanwhile makes the agent abandon the \
upload and wait). Leases need CAP_LEASE (the packaged systemd unit and \
DaemonSet grant it) and a local filesystem; without them a file seen being \
written is taken only after its writer closed it or it was renamed in, and a \
file found by a scan only after a longer quiet time and a /proc check. The \
agent logs at start-up, and `putonly check` prints, which rule each watch \
runs under. Hidden and temporary files are ignored, symbolic links are never \
followed (not even as folders in a file's path), FIFOs, sockets and devices \
are never opened (docs/SEMANTICS.md has the rule for every odd case). Its key is the watch's prefix plus its path inside the folder. The \
journal in [state] dir is the agent's only memory of what was sent (the \
bucket is never read): a done file is not sent again after a restart, and an \
interrupted multipart upload continues where it stopped.

Ordered batches: with [[watch]] marker = \"_SUCCESS\" (any globs on a file's \
name) a folder's marker is sent only after every other file of its folder and \
subfolders that was there when the agent took it up is sent (or deleted), \
across restarts and crashes too; `putonly status` shows a marker held back \
and the files it waits for. With manifest = true, <marker key>.manifest.json \
lists the batch's keys, sizes and checksums and is written before the marker.

SIGTERM or SIGINT: stop taking files, let in-flight uploads finish within \
[agent] shutdown_timeout, exit 0. SIGHUP does not reload the configuration: \
restart the agent instead (safe at any time).",
        after_long_help = AFTER_HELP
    )]
    Run(RunArgs),

    /// Show what the agent did and what waits, from the journal alone.
    #[command(long_about = "\
Show what the agent did and what waits, from the journal alone (nothing is \
sent): files done, pending and failed, the oldest pending, when the role \
credentials expire, the agent's last heartbeat, batch markers held back and \
why, files being streamed, the latest errors, and the folders and files the \
agent's user may not read yet (tools often set a folder's mode last; the \
agent tries them again as soon as it changes), as the agent last saw them. \
--json prints the same as one JSON object.")]
    Status(StatusArgs),

    /// List the receipts of the objects the agent stored, from the journal.
    #[command(
        long_about = "\
List the receipts the agent kept for every object it stored, oldest first, \
from the journal alone (nothing is sent; the bucket is never read): the \
time it was recorded, the local path, bucket, key, size, the checksum \
algorithm and value the server verified, the ETag, the version id (when \
the bucket has versioning) and the request id of the server's answer.

Receipts outlive the journal's file records: they are removed only after \
[state] keep_receipts (default: as long as [state] retention). --json prints \
one JSON object per line with the same fields `putonly push --json` prints \
for each file it uploaded.",
        after_long_help = "Exit status: 0, or 2 for a configuration error or a journal that \
cannot be read."
    )]
    Receipts(ReceiptsArgs),

    /// Check the set-up: configuration, folders, identity, role, and
    /// optionally one write per allowed prefix.
    #[command(
        long_about = "\
Check the set-up before the agent runs, the seed's \"assume the role and test\" \
step as one command: the configuration is valid (each problem names the key \
and the fix); each watched folder is readable and the state folder writable; \
which rule tells a finished file in each watch, and why (a [warn] line when \
no read lease can be had: no CAP_LEASE, or NFS, FUSE, overlay); \
every watch prefix lies inside bucket.allowed_prefixes; the base identity \
(STS GetCallerIdentity); the role can be assumed, as whom, and when its \
credentials expire.

Nothing is read from the bucket. --probe-write additionally writes one small \
object per allowed prefix (PREFIX/putonly-check/HOST-TIME.txt) to prove the \
permissions end to end, and explains an access denied answer; with [bucket] \
overwrite = false it also writes one probe object twice with If-None-Match: * \
and says whether the server enforces it (a [warn] line where the header is \
ignored and existing objects cannot be protected). --offline \
checks only the configuration and the folders, sending nothing (for \
systemd's ExecStartPre).",
        after_long_help = "Exit status: 0 when every check passed, 1 when one failed, 2 for a \
configuration error."
    )]
    Check(CheckArgs),

    /// Print the IAM documents the set-up needs, or lint existing ones.
    #[command(
        long_about = "\
Print the documents the cross-account set-up needs, generated from the \
configuration: the bucket policy for account B, the trust policy and the \
inline permission policy for the role in account A, and a lifecycle rule that \
removes abandoned multipart uploads. They grant only s3:PutObject on exactly \
the allowed prefixes (arn:aws:s3:::BUCKET/PREFIX*), plus s3:PutObjectAcl when \
bucket.acl is set and kms:GenerateDataKey/kms:Decrypt when SSE-KMS is.

`putonly policy lint FILE...` checks existing documents instead. Offline: \
nothing is sent to AWS.",
        after_long_help = "Exit status: 0, or 2 for a configuration error."
    )]
    Policy(Box<PolicyArgs>),

    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    #[command(
        long_about = "Print a completion script for SHELL on standard output, generated \
from the command-line definition.\n\n  putonly completions bash > /usr/share/bash-completion/completions/putonly"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff), generated from the command-line definition.
    #[command(
        long_about = "Print the putonly(1) man page in roff on standard output.\n\n  putonly man > putonly.1 && man ./putonly.1"
    )]
    Man,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub agent: AgentConfig,

    #[command(flatten)]
    pub external_id: ExternalIdFlags,

    /// Check the configuration and the folders only; send nothing.
    #[arg(long, conflicts_with = "probe_write")]
    pub offline: bool,

    /// Also write one small object per allowed prefix.
    #[arg(long)]
    pub probe_write: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: Option<PolicyCommand>,

    #[command(flatten)]
    pub aws: AwsFlags,

    /// Who assumes the role (trust policy), e.g.
    /// arn:aws:iam::111122223333:user/bobbytables. Default: account A itself
    /// (arn:aws:iam::A:root), leaving the choice to IAM policies there.
    /// Without a [role], the user or role whose keys write.
    #[arg(long, value_name = "ARN")]
    pub principal: Option<String>,

    /// One JSON object with the keys bucket_policy, trust_policy,
    /// role_policy and lifecycle_rule.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy documents against the configuration; report every
    /// problem with its location.
    #[command(
        long_about = "\
Check bucket, trust and role policy documents (JSON files, any order) \
against each other and, with --config (or --bucket and --allowed-prefix), \
against the configuration. Reports, each with FILE:LOCATION: invalid JSON \
(line:column), account ids that are not 12 digits, resources that do not \
cover or that exceed the allowed prefixes, `foo*` against `foo/*` between \
bucket and role policy, needless service principals in a trust policy, \
wildcard principals, and read or wildcard actions granted to the writer.",
        after_long_help = "Exit status: 0 when no problem was found, 1 when some were, 2 for a \
usage error (a file or the configuration cannot be read)."
    )]
    Lint(LintArgs),
}

#[derive(Debug, Args)]
pub struct LintArgs {
    #[command(flatten)]
    pub aws: AwsFlags,

    /// Policy documents (JSON).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// The agent's configuration file, shared by run and status.
#[derive(Debug, Args)]
pub struct AgentConfig {
    /// Configuration file (TOML; see agent.toml.example); its [state] dir
    /// names the journal.
    #[arg(
        short,
        long,
        env = "PUTONLY_CONFIG",
        value_name = "FILE",
        default_value = "/etc/putonly/agent.toml"
    )]
    pub config: PathBuf,
}

impl AgentConfig {
    /// Loads and resolves the file; a problem is reported on standard error
    /// and becomes the usage exit status.
    pub fn settings(&self) -> Result<crate::config::Settings, ExitCode> {
        self.settings_with(None)
    }

    /// The state settings of the file, for the commands that read the
    /// journal (`status`, `receipts`); a file without `state.dir` is a
    /// usage error saying what lives there (`what`).
    pub fn state(&self, what: &str) -> Result<crate::config::StateSettings, ExitCode> {
        let settings = self.settings()?;
        settings.state.ok_or_else(|| {
            eprintln!(
                "putonly: state.dir: is missing; {what} (add [state] dir = \"/var/lib/putonly\")"
            );
            ExitCode::from(EXIT_USAGE)
        })
    }

    /// As [`AgentConfig::settings`], with the external id flags laid over
    /// the file.
    pub fn settings_with(
        &self,
        external_id: Option<&ExternalIdFlags>,
    ) -> Result<crate::config::Settings, ExitCode> {
        RawConfig::load(&self.config)
            .and_then(|mut raw| {
                if let Some(flags) = external_id {
                    flags.apply(&mut raw)?;
                }
                crate::config::Settings::resolve(&raw)
            })
            .map_err(|e| {
                report_error(&e);
                ExitCode::from(EXIT_USAGE)
            })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub agent: AgentConfig,

    #[command(flatten)]
    pub external_id: ExternalIdFlags,
}

/// The environment variable that can hold the external id.
pub const EXTERNAL_ID_ENV: &str = "PUTONLY_EXTERNAL_ID";

/// The external id given on the command line or in the environment
/// (overrides [role] external_id and external_id_file).
#[derive(Debug, Args)]
pub struct ExternalIdFlags {
    /// External id the role's trust policy requires (overrides [role]
    /// external_id). A value given here is visible to every user of the
    /// machine in `ps` and stays in shell history: prefer --external-id-file,
    /// [role] external_id_file, or the PUTONLY_EXTERNAL_ID environment
    /// variable.
    #[arg(
        long,
        value_name = "ID",
        env = EXTERNAL_ID_ENV,
        hide_env_values = true
    )]
    pub external_id: Option<Secret>,

    /// File holding the external id on one line, readable by this user only
    /// (overrides [role] external_id and external_id_file, and
    /// PUTONLY_EXTERNAL_ID).
    #[arg(long, value_name = "FILE")]
    pub external_id_file: Option<PathBuf>,
}

impl ExternalIdFlags {
    /// Lays the external id over the configuration. One from the
    /// environment only fills in a role that exists (a role given by the
    /// file or --role-arn); --external-id-file wins over it. The id itself
    /// is never printed.
    pub fn apply(&self, raw: &mut RawConfig) -> Result<(), ConfigError> {
        let from_env = self
            .external_id
            .as_ref()
            .is_some_and(|id| std::env::var_os(EXTERNAL_ID_ENV).is_some_and(|v| v == id.expose()));
        let id = match (&self.external_id, &self.external_id_file) {
            (Some(_), Some(_)) if !from_env => {
                return Err(ConfigError::Invalid {
                    setting: "--external-id".into(),
                    problem: "is given together with --external-id-file".into(),
                    fix: "pass one of them (--external-id-file keeps the id out of ps)".into(),
                });
            }
            (_, Some(_)) => None,
            (Some(_), None) if from_env && raw.role.is_none() => None,
            (id, None) => id.clone(),
        };
        if id.is_none() && self.external_id_file.is_none() {
            return Ok(());
        }
        let role = raw.role.get_or_insert_with(RawRole::default);
        role.external_id = id;
        role.external_id_file = self.external_id_file.clone();
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub agent: AgentConfig,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReceiptsArgs {
    #[command(flatten)]
    pub agent: AgentConfig,

    /// Only receipts recorded at or after T: an RFC 3339 time
    /// (2026-11-29T06:00:00Z) or a duration back from now (1h, 7d).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,

    /// One JSON object per line (JSON Lines) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Where the configuration comes from, and the flags that override it.
#[derive(Debug, Args)]
pub struct AwsFlags {
    /// Configuration file (TOML; see agent.toml.example). Optional for push.
    #[arg(short, long, env = "PUTONLY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Bucket to write into (overrides [bucket] name).
    #[arg(long, value_name = "BUCKET")]
    pub bucket: Option<String>,

    /// Prefix putonly may write into; repeat for several (overrides
    /// [bucket] allowed_prefixes). Without it and without a configuration
    /// file, the --prefix given is the only one allowed.
    #[arg(long = "allowed-prefix", value_name = "PREFIX")]
    pub allowed_prefixes: Vec<String>,

    /// Role to assume with STS (overrides [role] arn).
    #[arg(long, value_name = "ARN")]
    pub role_arn: Option<String>,

    #[command(flatten)]
    pub external_id: ExternalIdFlags,

    /// Profile holding the base credentials (overrides [aws] profile).
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,

    /// AWS region (overrides [aws] region).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,

    /// S3 and STS endpoint, for S3-compatible stores (overrides [aws]
    /// endpoint_url). https://, or plain http:// to this machine
    /// (127.0.0.1, ::1, localhost) only, unless --allow-insecure-http.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// Allow a plain http:// endpoint on another host (sets [aws]
    /// allow_insecure_http): the temporary credentials and the files then
    /// cross the network unencrypted. Only for a network you trust.
    #[arg(long)]
    pub allow_insecure_http: bool,
}

impl AwsFlags {
    /// Loads the configuration file, if any, and lays the flags over it.
    pub fn apply(&self) -> Result<RawConfig, ConfigError> {
        let mut raw = match &self.config {
            Some(path) => RawConfig::load(path)?,
            None => RawConfig::default(),
        };
        if let Some(b) = &self.bucket {
            raw.bucket.name = Some(b.clone());
        }
        if !self.allowed_prefixes.is_empty() {
            raw.bucket.allowed_prefixes = Some(self.allowed_prefixes.clone());
        }
        if let Some(arn) = &self.role_arn {
            raw.role.get_or_insert_with(RawRole::default).arn = Some(arn.clone());
        }
        self.external_id.apply(&mut raw)?;
        if let Some(p) = &self.profile {
            raw.aws.profile = Some(p.clone());
        }
        if let Some(r) = &self.region {
            raw.aws.region = Some(r.clone());
        }
        if let Some(u) = &self.endpoint_url {
            raw.aws.endpoint_url = Some(u.clone());
            raw.aws.endpoint_url_from_flag = true;
        }
        if self.allow_insecure_http {
            raw.aws.allow_insecure_http = Some(true);
        }
        Ok(raw)
    }
}

#[derive(Debug, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub aws: AwsFlags,

    /// Key prefix for the files (a '/' is added if missing). Defaults to the
    /// only allowed prefix when there is exactly one.
    #[arg(short, long, value_name = "PREFIX", conflicts_with = "key")]
    pub prefix: Option<String>,

    /// Exact key for a single file.
    #[arg(short, long, value_name = "KEY")]
    pub key: Option<String>,

    /// Part size for multipart uploads, e.g. 16MiB (overrides [upload] part_size).
    #[arg(long, value_name = "SIZE")]
    pub part_size: Option<String>,

    /// Parts of part_size in memory at once: peak memory is about
    /// part_size x N (overrides [upload] concurrency).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,

    /// Requests in flight at once, whatever their size: small files go many
    /// at a time within the memory bound (overrides [upload] requests_in_flight).
    #[arg(long, value_name = "N")]
    pub requests_in_flight: Option<usize>,

    /// Cap on upload bytes per second, e.g. 50MiB/s (overrides [upload] bandwidth_limit).
    #[arg(long, value_name = "RATE")]
    pub bandwidth_limit: Option<String>,

    /// Canned ACL for each object, e.g. bucket-owner-full-control (overrides [bucket] acl).
    #[arg(long, value_name = "ACL")]
    pub acl: Option<String>,

    /// Never replace an object already at a key (sets [bucket] overwrite =
    /// false): each object is written with `If-None-Match: *`, and a key
    /// that already holds one is reported as "exists" and left as it is.
    /// Nothing is read to find out: the server refuses the write (412).
    #[arg(long)]
    pub no_overwrite: bool,

    /// Exit with status 1 when a file was not sent because its key already
    /// held an object (with --no-overwrite or [bucket] overwrite = false);
    /// by default that is not a failure.
    #[arg(long)]
    pub fail_on_exists: bool,

    /// Print one JSON object per file on standard output (and no progress
    /// bars); an uploaded file's carries its receipt, the fields `putonly
    /// receipts --json` prints (time, key, size, checksum, etag,
    /// version_id, request_id, ...).
    #[arg(long)]
    pub json: bool,

    /// No progress bars, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,

    /// Follow symbolic links met inside the named folders (a link named on
    /// the command line is always followed). Without it they are skipped
    /// and reported.
    #[arg(long)]
    pub follow_links: bool,

    /// Files and folders to upload.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Sets up logging on standard error. `PUTONLY_LOG` (a tracing filter)
/// overrides the level chosen by `-v`; the agent logs its own info lines by
/// default, the one-shot commands only warnings.
pub fn init_logging(cli: &Cli) {
    let daemon = matches!(cli.command, Command::Run(_));
    let default = match (cli.verbose, daemon) {
        // The SDK's own warnings (an unreachable instance metadata service
        // while looking for credentials, ...) repeat what putonly reports.
        (0, false) => "warn,aws_config=error",
        (0, true) | (1, _) => "warn,aws_config=error,putonly=info",
        (2, _) => "info,putonly=debug",
        _ => "debug,putonly=trace",
    };
    let format = cli.log_format;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUTONLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // One event, one line: names in fields cannot forge log lines.
        .with_writer(|| crate::ground::printable::OneLine(std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Runs the parsed command line; the exit status follows [`EXIT_OK`],
/// [`EXIT_FAILED`] and [`EXIT_USAGE`].
/// A journal `status` or `receipts` cannot open: the error, and, when
/// there is none yet, whether the agent has run with this configuration.
pub(crate) fn unreadable_journal(
    e: &crate::journal::JournalError,
    config: &std::path::Path,
) -> ExitCode {
    report_error(e);
    if e.is_missing() {
        eprintln!(
            "putonly: has the agent run with this configuration yet? (putonly run --config {})",
            config.display()
        );
    }
    ExitCode::from(EXIT_USAGE)
}

pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Push(args) => push::run(*args).await,
        Command::Run(args) => run_agent(args).await,
        Command::Status(args) => status::run(args),
        Command::Receipts(args) => receipts::run(args),
        Command::Check(args) => check::run(args).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "putonly",
                &mut std::io::stdout(),
            );
            ExitCode::from(EXIT_OK)
        }
        Command::Man => man(),
        Command::Policy(args) => match args.command {
            Some(PolicyCommand::Lint(lint)) => policy::lint(lint),
            None => policy::run(*args),
        },
    }
}

async fn run_agent(args: RunArgs) -> ExitCode {
    let settings = match args.agent.settings_with(Some(&args.external_id)) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match crate::agent::run(settings).await {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(crate::agent::AgentError::Config(e)) => {
            report_error(&e);
            ExitCode::from(EXIT_USAGE)
        }
        Err(e @ crate::agent::AgentError::Journal(crate::journal::JournalError::Locked { .. })) => {
            report_error(&e);
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            report_error(&e);
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// The man page: the top-level page with every subcommand's help appended.
fn man() -> ExitCode {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut out = Vec::new();
    let page = clap_mangen::Man::new(cmd.clone());
    let rendered = page.render(&mut out).and_then(|()| {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_name().to_string();
            let mut section = Vec::new();
            clap_mangen::Man::new(sub.clone()).render_description_section(&mut section)?;
            let mut opts = Vec::new();
            clap_mangen::Man::new(sub.clone()).render_options_section(&mut opts)?;
            out.extend_from_slice(format!(".SH \"PUTONLY {}\"\n", name.to_uppercase()).as_bytes());
            out.extend(section.into_iter().skip_while(|&b| b != b'\n').skip(1));
            out.extend(opts.into_iter().skip_while(|&b| b != b'\n').skip(1));
        }
        use std::io::Write;
        std::io::stdout().write_all(&out)
    });
    match rendered {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!("putonly: cannot write the man page: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Prints an error with its whole chain, prefixed with the program name.
pub(crate) fn report_error(e: &dyn std::error::Error) {
    let chain = crate::credentials::error_chain(e);
    eprintln!("putonly: {}", crate::ground::printable::printable(&chain));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(args: &[&str]) -> PushArgs {
        let mut all = vec!["putonly", "push", "--bucket", "b-1", "--prefix", "foo/"];
        all.extend_from_slice(args);
        all.push("file.csv");
        match Cli::try_parse_from(all).unwrap().command {
            Command::Push(p) => *p,
            _ => unreachable!(),
        }
    }

    fn role_of(args: &PushArgs) -> Option<crate::config::RoleSettings> {
        let mut raw = args.aws.apply().unwrap();
        raw.bucket.allowed_prefixes = Some(vec!["foo/".into()]);
        crate::config::Settings::resolve(&raw).unwrap().role
    }

    const ARN: &str = "arn:aws:iam::123456789012:role/r";

    #[test]
    fn the_external_id_comes_from_the_flag_the_environment_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("id");
        std::fs::write(&file, "from-file-7\n").unwrap();
        let file_arg = file.to_str().unwrap();
        let id = |args: &[&str]| {
            role_of(&push(args)).and_then(|r| r.external_id.map(|s| s.expose().to_string()))
        };
        assert_eq!(
            id(&["--role-arn", ARN, "--external-id", "flag-5"]).as_deref(),
            Some("flag-5")
        );
        assert_eq!(
            id(&["--role-arn", ARN, "--external-id-file", file_arg]).as_deref(),
            Some("from-file-7")
        );
        // Both on the command line: refused, naming both.
        let both = push(&[
            "--role-arn",
            ARN,
            "--external-id",
            "x-1",
            "--external-id-file",
            file_arg,
        ]);
        let err = both.aws.apply().unwrap_err().to_string();
        assert!(
            err.starts_with("--external-id: is given together with --external-id-file"),
            "{err}"
        );

        // SAFETY: the only test that sets this variable; the assertions that
        // need it unset come before.
        unsafe { std::env::set_var(EXTERNAL_ID_ENV, "env-6") };
        assert_eq!(id(&["--role-arn", ARN]).as_deref(), Some("env-6"));
        // The file flag wins over the environment; the environment alone
        // makes no role.
        assert_eq!(
            id(&["--role-arn", ARN, "--external-id-file", file_arg]).as_deref(),
            Some("from-file-7")
        );
        assert!(role_of(&push(&[])).is_none());
        // Neither the parsed flags nor --help show the value.
        let parsed = push(&["--role-arn", ARN]);
        assert!(!format!("{parsed:?}").contains("env-6"), "{parsed:?}");
        use clap::CommandFactory;
        let help = Cli::command()
            .find_subcommand_mut("push")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("PUTONLY_EXTERNAL_ID"), "{help}");
        assert!(!help.contains("env-6"), "{help}");
        unsafe { std::env::remove_var(EXTERNAL_ID_ENV) };
    }

    #[test]
    fn flags_over_a_plain_http_endpoint() {
        let mut raw = push(&["--endpoint-url", "http://192.0.2.1:9000"])
            .aws
            .apply()
            .unwrap();
        raw.bucket.allowed_prefixes = Some(vec!["foo/".into()]);
        let err = crate::config::Settings::resolve(&raw)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--endpoint-url: http://192.0.2.1:9000 is plain http"),
            "{err}"
        );
        let mut raw = push(&[
            "--endpoint-url",
            "http://192.0.2.1:9000",
            "--allow-insecure-http",
        ])
        .aws
        .apply()
        .unwrap();
        raw.bucket.allowed_prefixes = Some(vec!["foo/".into()]);
        crate::config::Settings::resolve(&raw).unwrap();
    }
}

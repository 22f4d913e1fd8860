//! `putonly policy` and `putonly policy lint`: print the IAM documents a
//! configuration needs, or check hand-written ones against it. Both work
//! offline: they never talk to AWS and never change anything.

use std::process::ExitCode;

use serde_json::Value;

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, LintArgs, PolicyArgs, report_error};
use crate::config::Settings;
use crate::ops::policy::{self, ABORT_AFTER_DAYS, Documents};

pub fn run(args: PolicyArgs) -> ExitCode {
    let settings = match args.aws.apply().and_then(|raw| Settings::resolve(&raw)) {
        Ok(s) => s,
        Err(e) => {
            report_error(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let docs = match policy::generate(&settings, args.principal.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("putonly: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&docs).unwrap_or_default()
        );
    } else {
        print!("{}", text(&settings, &docs));
    }
    ExitCode::from(EXIT_OK)
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The documents, labelled, with where each goes and the command that puts
/// it there.
fn text(settings: &Settings, d: &Documents) -> String {
    let bucket = &settings.bucket.name;
    let mut out = String::new();
    out.push_str(&format!(
        "# 1. Bucket policy (account B, the bucket owner): lets the writer put objects\n\
         #    into {} only. Merge it with any policy the bucket already has:\n\
         #    aws s3api put-bucket-policy --bucket {bucket} --policy file://bucket-policy.json\n{}\n\n",
        settings.bucket.guard,
        pretty(&d.bucket_policy)
    ));
    match (&settings.role, &d.trust_policy) {
        (Some(role), Some(trust)) => {
            let name = role.arn.rsplit('/').next().unwrap_or("putonly-writer");
            out.push_str(&format!(
                "# 2. Trust policy (account A): who may assume the role {}.\n\
                 #    aws iam create-role --role-name {name} --assume-role-policy-document file://trust-policy.json\n\
                 #    (or, for an existing role: aws iam update-assume-role-policy --role-name {name} --policy-document file://trust-policy.json)\n{}\n\n",
                role.arn,
                pretty(trust)
            ));
            out.push_str(&format!(
                "# 3. Role policy (account A): the role's inline permission policy.\n\
                 #    aws iam put-role-policy --role-name {name} --policy-name putonly-write --policy-document file://role-policy.json\n{}\n\n",
                pretty(&d.role_policy)
            ));
        }
        _ => {
            out.push_str(
                "# 2. Trust policy: none. No [role] is configured, so the base credentials\n\
                 #    write directly and nothing is assumed.\n\n",
            );
            out.push_str(&format!(
                "# 3. Writer policy (account A): the inline policy of the user or role whose\n\
                 #    keys putonly uses.\n\
                 #    aws iam put-user-policy --user-name NAME --policy-name putonly-write --policy-document file://role-policy.json\n{}\n\n",
                pretty(&d.role_policy)
            ));
        }
    }
    out.push_str(&format!(
        "# 4. Lifecycle rule (account B): removes the parts of multipart uploads left\n\
         #    unfinished for {ABORT_AFTER_DAYS} days (putonly's abort needs a permission it is not given).\n\
         #    This command REPLACES the bucket's lifecycle configuration: merge first.\n\
         #    aws s3api put-bucket-lifecycle-configuration --bucket {bucket} --lifecycle-configuration file://lifecycle.json\n{}\n",
        pretty(&d.lifecycle_rule)
    ));
    out
}

pub fn lint(args: LintArgs) -> ExitCode {
    let configured = args.aws.config.is_some()
        || args.aws.bucket.is_some()
        || !args.aws.allowed_prefixes.is_empty();
    let settings = if configured {
        match args.aws.apply().and_then(|raw| Settings::resolve(&raw)) {
            Ok(s) => Some(s),
            Err(e) => {
                report_error(&e);
                return ExitCode::from(EXIT_USAGE);
            }
        }
    } else {
        None
    };
    let mut findings = Vec::new();
    let mut parsed = Vec::new();
    for file in &args.files {
        let name = file.display().to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("putonly: cannot read {name}: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        match policy::parse(&name, &text) {
            Ok(p) => parsed.push(p),
            Err(f) => findings.push(f),
        }
    }
    findings.extend(policy::lint(&parsed, settings.as_ref()));
    for f in &findings {
        println!("{f}");
    }
    if findings.is_empty() {
        let against = if settings.is_some() {
            "against the configuration"
        } else {
            "(no configuration given: prefixes and bucket not checked)"
        };
        eprintln!(
            "{} document(s) checked {against}: no problems",
            parsed.len()
        );
        ExitCode::from(EXIT_OK)
    } else {
        eprintln!("{} problem(s)", findings.len());
        ExitCode::from(EXIT_FAILED)
    }
}

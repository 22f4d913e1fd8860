//! IAM documents for the cross-account set-up: generating the least-privilege
//! bucket policy, trust policy, role policy and lifecycle rule a
//! configuration needs, and linting hand-written ones against it.
//!
//! This module owns what "least privilege" means for putonly: only
//! `s3:PutObject` on `bucket/prefix*` for exactly the allowed prefixes, plus
//! `s3:PutObjectAcl` when an ACL is configured and the KMS actions when
//! SSE-KMS is. It is pure logic on JSON values: it never reads files, never
//! talks to AWS, and never relaxes a document to make it pass.

use serde_json::{Value, json};

use crate::config::{Settings, Sse};

/// The four documents `putonly policy` prints.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Documents {
    /// For the bucket in account B.
    pub bucket_policy: Value,
    /// For the role in account A; `None` when no role is configured.
    pub trust_policy: Option<Value>,
    /// The role's (or the writing user's) inline permission policy.
    pub role_policy: Value,
    /// For the bucket in account B: abort incomplete multipart uploads.
    pub lifecycle_rule: Value,
}

/// Why documents cannot be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "no [role] is configured, so the writer is whoever owns the base credentials: name it with --principal arn:aws:iam::111122223333:user/NAME"
    )]
    NoPrincipal,
    #[error(
        "--principal {0:?} is not an IAM ARN; use arn:aws:iam::111122223333:user/NAME or arn:aws:iam::111122223333:role/NAME"
    )]
    BadPrincipal(String),
}

/// Days after which incomplete multipart uploads are removed.
pub const ABORT_AFTER_DAYS: u32 = 7;

/// The S3 actions the writer needs. `bucket.overwrite = false` adds none:
/// a conditional write (`If-None-Match: *` on PutObject and
/// CompleteMultipartUpload) needs only `s3:PutObject` in AWS; a bucket
/// owner who wants to force it may add a Deny on `s3:if-none-match`.
pub fn s3_actions(settings: &Settings) -> Vec<&'static str> {
    let mut actions = vec!["s3:PutObject"];
    if settings.bucket.acl.is_some() {
        actions.push("s3:PutObjectAcl");
    }
    actions
}

/// The KMS actions an SSE-KMS multipart upload needs.
pub const KMS_ACTIONS: [&str; 2] = ["kms:GenerateDataKey", "kms:Decrypt"];

/// `arn:aws:s3:::bucket/prefix*` for each allowed prefix.
pub fn s3_resources(settings: &Settings) -> Vec<String> {
    settings
        .bucket
        .guard
        .prefixes()
        .iter()
        .map(|p| format!("arn:aws:s3:::{}/{p}*", settings.bucket.name))
        .collect()
}

/// The account id inside an IAM ARN (`arn:aws:iam::ACCOUNT:...`).
pub fn arn_account(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(_), Some(_), Some(_), Some(account)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    Some(account)
}

fn is_iam_arn(s: &str) -> bool {
    s.starts_with("arn:aws") && s.contains(":iam::") && arn_account(s).is_some()
}

/// Generates the documents for `settings`. `principal` is who assumes the
/// role (default: account A itself, `arn:aws:iam::A:root`), or, without a
/// role, who writes with the base credentials.
pub fn generate(settings: &Settings, principal: Option<&str>) -> Result<Documents, PolicyError> {
    if let Some(p) = principal
        && !is_iam_arn(p)
    {
        return Err(PolicyError::BadPrincipal(p.to_string()));
    }
    let writer = match (&settings.role, principal) {
        (Some(role), _) => role.arn.clone(),
        (None, Some(p)) => p.to_string(),
        (None, None) => return Err(PolicyError::NoPrincipal),
    };
    let actions = s3_actions(settings);
    let resources = s3_resources(settings);
    let bucket_policy = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "PutonlyWriteOnly",
            "Effect": "Allow",
            "Principal": { "AWS": writer },
            "Action": actions,
            "Resource": resources,
        }]
    });
    let trust_policy = settings.role.as_ref().map(|role| {
        let assumer = principal.map(str::to_string).unwrap_or_else(|| {
            format!(
                "arn:aws:iam::{}:root",
                arn_account(&role.arn).unwrap_or("111122223333")
            )
        });
        let mut statement = json!({
            "Sid": "PutonlyAssume",
            "Effect": "Allow",
            "Principal": { "AWS": assumer },
            "Action": "sts:AssumeRole",
        });
        if let Some(id) = &role.external_id {
            statement["Condition"] = json!({ "StringEquals": { "sts:ExternalId": id.expose() } });
        }
        json!({ "Version": "2012-10-17", "Statement": [statement] })
    });
    let mut statements = vec![json!({
        "Sid": "PutonlyWriteOnly",
        "Effect": "Allow",
        "Action": actions,
        "Resource": resources,
    })];
    if let Some(Sse::Kms { key_id }) = &settings.bucket.sse {
        let key = key_id
            .as_deref()
            .filter(|k| k.starts_with("arn:"))
            .unwrap_or("*");
        statements.push(json!({
            "Sid": "PutonlyKms",
            "Effect": "Allow",
            "Action": KMS_ACTIONS,
            "Resource": key,
        }));
    }
    let role_policy = json!({ "Version": "2012-10-17", "Statement": statements });
    let rules: Vec<Value> = settings
        .bucket
        .guard
        .prefixes()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "ID": format!("putonly-abort-incomplete-uploads-{}", i + 1),
                "Status": "Enabled",
                "Filter": { "Prefix": p },
                "AbortIncompleteMultipartUpload": { "DaysAfterInitiation": ABORT_AFTER_DAYS },
            })
        })
        .collect();
    Ok(Documents {
        bucket_policy,
        trust_policy,
        role_policy,
        lifecycle_rule: json!({ "Rules": rules }),
    })
}

/// One problem `putonly policy lint` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file name as given.
    pub file: String,
    /// `line:column` for syntax errors, else a path such as
    /// `Statement[0].Resource[1]`.
    pub location: String,
    pub problem: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.location, self.problem)
    }
}

/// What kind of document a file holds, judged from its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A resource policy on the bucket (statements name a Principal).
    Bucket,
    /// A role's trust policy (statements allow sts:AssumeRole).
    Trust,
    /// An identity policy (no Principal).
    Identity,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Bucket => "bucket policy",
            Kind::Trust => "trust policy",
            Kind::Identity => "role policy",
        }
    }
}

/// Statements as a list (a single statement object counts as one).
fn statements(doc: &Value) -> Vec<(String, &Value)> {
    match doc.get("Statement") {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("Statement[{i}]"), s))
            .collect(),
        Some(s @ Value::Object(_)) => vec![("Statement".to_string(), s)],
        _ => Vec::new(),
    }
}

/// A string or a list of strings, with the location of each.
fn strings<'a>(value: Option<&'a Value>, at: &str) -> Vec<(String, &'a str)> {
    match value {
        Some(Value::String(s)) => vec![(at.to_string(), s.as_str())],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_str().map(|s| (format!("{at}[{i}]"), s)))
            .collect(),
        _ => Vec::new(),
    }
}

fn kind_of(doc: &Value) -> Kind {
    let sts = statements(doc).iter().any(|(at, s)| {
        strings(s.get("Action"), at)
            .iter()
            .any(|(_, a)| a.to_ascii_lowercase().starts_with("sts:assumerole"))
    });
    if sts {
        Kind::Trust
    } else if statements(doc)
        .iter()
        .any(|(_, s)| s.get("Principal").is_some())
    {
        Kind::Bucket
    } else {
        Kind::Identity
    }
}

/// A parsed document, ready for [`lint`].
pub struct Parsed {
    pub file: String,
    pub kind: Kind,
    pub doc: Value,
}

/// Parses one document; a syntax error is a finding with its line and column.
pub fn parse(file: &str, text: &str) -> Result<Parsed, Finding> {
    match serde_json::from_str::<Value>(text) {
        Ok(doc) => Ok(Parsed {
            file: file.to_string(),
            kind: kind_of(&doc),
            doc,
        }),
        Err(e) => {
            let message = e.to_string();
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(m, _)| m);
            Err(Finding {
                file: file.to_string(),
                location: format!("{}:{}", e.line(), e.column()),
                problem: format!("not valid JSON: {message}"),
            })
        }
    }
}

/// Actions that read, list or grant everything: never for the writer.
fn too_broad(action: &str) -> bool {
    let a = action.to_ascii_lowercase();
    a == "*"
        || a.ends_with(":*")
        || a.contains('*')
        || ["s3:get", "s3:list", "s3:head", "s3:delete", "s3:restore"]
            .iter()
            .any(|p| a.starts_with(p))
}

/// Checks documents against each other and, if given, the configuration.
/// Returns every problem; none means the documents are fit for putonly.
pub fn lint(docs: &[Parsed], settings: Option<&Settings>) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut s3_patterns: Vec<(Kind, String, String, String)> = Vec::new(); // kind, file, location, pattern
    for d in docs {
        let find = |location: String, problem: String| Finding {
            file: d.file.clone(),
            location,
            problem,
        };
        if statements(&d.doc).is_empty() {
            out.push(find(
                "Statement".into(),
                "no statements: this is not an IAM policy document".into(),
            ));
            continue;
        }
        for (at, st) in statements(&d.doc) {
            let allow = st.get("Effect").and_then(Value::as_str) == Some("Allow");
            // Account ids: in principals and IAM ARNs, exactly 12 digits.
            let mut ids: Vec<(String, String)> = Vec::new();
            if let Some(p) = st.get("Principal") {
                if p.as_str() == Some("*") {
                    out.push(find(
                        format!("{at}.Principal"),
                        "\"*\" lets anyone in; name the one user or role".into(),
                    ));
                }
                for (loc, v) in strings(p.get("AWS"), &format!("{at}.Principal.AWS")) {
                    if v == "*" {
                        out.push(find(
                            loc.clone(),
                            "\"*\" lets any AWS account in; name the one user or role".into(),
                        ));
                    } else if v.starts_with("arn:") {
                        if let Some(acct) = arn_account(v) {
                            ids.push((loc, acct.to_string()));
                        }
                    } else {
                        ids.push((loc, v.to_string()));
                    }
                }
                if d.kind == Kind::Bucket
                    && let Some(role) = settings.and_then(|s| s.role.as_ref())
                {
                    let names = strings(p.get("AWS"), "");
                    if allow && !names.iter().any(|(_, v)| *v == role.arn) {
                        out.push(find(
                            format!("{at}.Principal"),
                            format!(
                                "does not name the role putonly assumes ({}); the bucket would refuse its writes",
                                role.arn
                            ),
                        ));
                    }
                }
                if d.kind == Kind::Trust {
                    for (loc, svc) in strings(p.get("Service"), &format!("{at}.Principal.Service"))
                    {
                        out.push(find(
                            loc,
                            format!(
                                "service principal {svc:?} is not needed: only the user or role running putonly assumes this role; remove it"
                            ),
                        ));
                    }
                }
            }
            for (loc, r) in strings(st.get("Resource"), &format!("{at}.Resource")) {
                if r.contains(":iam::")
                    && let Some(acct) = arn_account(r)
                {
                    ids.push((loc, acct.to_string()));
                }
            }
            for (loc, id) in ids {
                if !(id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit())) {
                    out.push(find(
                        loc,
                        format!("account id {id:?} is not 12 digits; use the real account id (e.g. 111122223333)"),
                    ));
                }
            }
            if d.kind == Kind::Trust || !allow {
                continue;
            }
            // Actions: writes only.
            let actions = strings(st.get("Action"), &format!("{at}.Action"));
            for (loc, a) in &actions {
                if too_broad(a) {
                    out.push(find(
                        loc.clone(),
                        format!(
                            "{a:?} grants more than writing; the writer needs only s3:PutObject"
                        ),
                    ));
                } else if a.eq_ignore_ascii_case("s3:PutObjectAcl")
                    && settings.is_some_and(|s| s.bucket.acl.is_none())
                {
                    out.push(find(
                        loc.clone(),
                        "s3:PutObjectAcl is not needed: bucket.acl is not set (with \"Bucket owner enforced\" ownership no ACL is needed); remove it".into(),
                    ));
                }
            }
            if st.get("NotAction").is_some() || st.get("NotResource").is_some() {
                out.push(find(
                    at.clone(),
                    "NotAction/NotResource grant everything else; list the actions and resources"
                        .into(),
                ));
            }
            // Resources: bucket/prefix* for exactly the allowed prefixes.
            for (loc, r) in strings(st.get("Resource"), &format!("{at}.Resource")) {
                let Some(rest) = r.strip_prefix("arn:aws:s3:::") else {
                    if r == "*" {
                        out.push(find(
                            loc,
                            "\"*\" is every resource; use arn:aws:s3:::BUCKET/PREFIX*".into(),
                        ));
                    }
                    continue;
                };
                let (bucket, pattern) = rest.split_once('/').unwrap_or((rest, ""));
                if let Some(s) = settings
                    && bucket != s.bucket.name
                {
                    out.push(find(
                        loc.clone(),
                        format!(
                            "names bucket {bucket:?}, but putonly writes to {:?}",
                            s.bucket.name
                        ),
                    ));
                    continue;
                }
                s3_patterns.push((d.kind, d.file.clone(), loc.clone(), pattern.to_string()));
                if let Some(s) = settings {
                    let prefixes = s.bucket.guard.prefixes();
                    let base = pattern.trim_end_matches('*');
                    if prefixes.iter().any(|p| format!("{p}*") == pattern) {
                        continue;
                    }
                    let suggestion = prefixes
                        .iter()
                        .find(|p| p.starts_with(base) || base.starts_with(p.as_str()))
                        .map(|p| format!("; use arn:aws:s3:::{bucket}/{p}*"))
                        .unwrap_or_default();
                    if !pattern.ends_with('*') || pattern[..pattern.len() - 1].contains('*') {
                        out.push(find(
                            loc,
                            format!(
                                "{r:?} is not of the form arn:aws:s3:::BUCKET/PREFIX*{suggestion}"
                            ),
                        ));
                    } else if prefixes.iter().any(|p| p.starts_with(base)) {
                        out.push(find(
                            loc,
                            format!(
                                "{r:?} exceeds bucket.allowed_prefixes ({}): it also matches keys outside them, such as \"{base}x.txt\"{suggestion}",
                                s.bucket.guard
                            ),
                        ));
                    } else {
                        out.push(find(
                            loc,
                            format!(
                                "{r:?} does not cover any of bucket.allowed_prefixes ({}) whole{suggestion}",
                                s.bucket.guard
                            ),
                        ));
                    }
                }
            }
        }
    }
    // Coverage: every allowed prefix granted by each S3 document.
    if let Some(s) = settings {
        for d in docs.iter().filter(|d| d.kind != Kind::Trust) {
            for p in s.bucket.guard.prefixes() {
                // Covered by PATTERN* when PATTERN is the prefix or a part
                // of it (too wide is reported above, not as a gap).
                let covered = s3_patterns.iter().any(|(_, file, _, pat)| {
                    *file == d.file
                        && pat
                            .strip_suffix('*')
                            .is_some_and(|base| !base.contains('*') && p.starts_with(base))
                });
                if !covered
                    && statements(&d.doc)
                        .iter()
                        .any(|(_, st)| st.get("Resource").is_some())
                {
                    out.push(Finding {
                        file: d.file.clone(),
                        location: "Statement".into(),
                        problem: format!(
                            "no statement grants arn:aws:s3:::{}/{p}*: uploads into {p} would be denied",
                            s.bucket.name
                        ),
                    });
                }
            }
        }
    }
    // Bucket policy and role policy must name the same prefixes the same way.
    let by_kind = |k: Kind| -> Vec<(String, String, String)> {
        s3_patterns
            .iter()
            .filter(|(kind, ..)| *kind == k)
            .map(|(_, f, l, p)| (f.clone(), l.clone(), p.clone()))
            .collect()
    };
    let (bucket, identity) = (by_kind(Kind::Bucket), by_kind(Kind::Identity));
    if !bucket.is_empty() && !identity.is_empty() {
        for (file, loc, pat) in &bucket {
            if identity.iter().any(|(_, _, p)| p == pat) {
                continue;
            }
            let base = pat.trim_end_matches('*');
            if let Some((ifile, iloc, ipat)) = identity.iter().find(|(_, _, p)| {
                let b = p.trim_end_matches('*');
                b.starts_with(base) || base.starts_with(b)
            }) {
                out.push(Finding {
                    file: file.clone(),
                    location: loc.clone(),
                    problem: format!(
                        "{} grants {pat:?} but the {} ({ifile}:{iloc}) grants {ipat:?}: write both the same way, as PREFIX/*",
                        Kind::Bucket.name(),
                        Kind::Identity.name()
                    ),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    const SEED_CONFIG: &str = "[role]\narn = \"arn:aws:iam::123456789012:role/account-a-s3-role\"\n\
        [bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n";

    fn settings(text: &str) -> Settings {
        Settings::resolve(&RawConfig::parse(text).unwrap()).unwrap()
    }

    fn parsed(file: &str, v: &Value) -> Parsed {
        parse(file, &serde_json::to_string_pretty(v).unwrap()).unwrap()
    }

    #[test]
    fn generated_documents_are_least_privilege_and_lint_clean() {
        let s = settings(SEED_CONFIG);
        let d = generate(&s, Some("arn:aws:iam::123456789012:user/bobbytables")).unwrap();
        assert_eq!(
            d.bucket_policy["Statement"][0]["Resource"],
            json!([
                "arn:aws:s3:::account-b-bucket/foo/*",
                "arn:aws:s3:::account-b-bucket/fighters/*"
            ])
        );
        assert_eq!(
            d.role_policy["Statement"][0]["Action"],
            json!(["s3:PutObject"])
        );
        let trust = d.trust_policy.clone().unwrap();
        assert_eq!(
            trust["Statement"][0]["Principal"]["AWS"],
            "arn:aws:iam::123456789012:user/bobbytables"
        );
        assert_eq!(d.lifecycle_rule["Rules"].as_array().unwrap().len(), 2);
        let docs = [
            parsed("bucket.json", &d.bucket_policy),
            parsed("trust.json", &trust),
            parsed("role.json", &d.role_policy),
        ];
        assert_eq!(lint(&docs, Some(&s)), vec![]);
    }

    #[test]
    fn no_overwrite_needs_no_other_permission() {
        let on = generate(&settings(SEED_CONFIG), None).unwrap();
        let off = generate(
            &settings(&format!("{SEED_CONFIG}overwrite = false\n")),
            None,
        )
        .unwrap();
        assert_eq!(on, off, "If-None-Match writes are covered by s3:PutObject");
    }

    #[test]
    fn acl_and_kms_add_exactly_their_actions() {
        let s = settings(&format!(
            "{SEED_CONFIG}acl = \"bucket-owner-full-control\"\nsse = \"aws:kms\"\n\
             sse_kms_key_id = \"arn:aws:kms:us-east-1:123456789012:key/k1\"\n"
        ));
        let d = generate(&s, None).unwrap();
        assert_eq!(
            d.role_policy["Statement"][0]["Action"],
            json!(["s3:PutObject", "s3:PutObjectAcl"])
        );
        assert_eq!(d.role_policy["Statement"][1]["Action"], json!(KMS_ACTIONS));
        assert_eq!(
            d.role_policy["Statement"][1]["Resource"],
            "arn:aws:kms:us-east-1:123456789012:key/k1"
        );
        assert_eq!(
            d.trust_policy.unwrap()["Statement"][0]["Principal"]["AWS"],
            "arn:aws:iam::123456789012:root"
        );
    }

    #[test]
    fn without_a_role_the_principal_is_required() {
        let s = settings("[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n");
        assert_eq!(generate(&s, None), Err(PolicyError::NoPrincipal));
        assert!(matches!(
            generate(&s, Some("bobbytables")),
            Err(PolicyError::BadPrincipal(_))
        ));
        let d = generate(&s, Some("arn:aws:iam::123456789012:user/writer")).unwrap();
        assert!(d.trust_policy.is_none());
    }

    /// The seed article's own documents: each of their mistakes is found.
    #[test]
    fn every_mistake_of_the_seed_documents_is_reported() {
        let s = settings(SEED_CONFIG);
        let fixture = |name: &str| {
            let path = format!("{}/tests/fixtures/seed/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(path).unwrap()
        };
        let bucket = parse("bucket-policy.json", &fixture("bucket-policy.json")).unwrap();
        let role = parse("role-policy.json", &fixture("role-policy.json")).unwrap();
        let Err(syntax) = parse("trust-policy.json", &fixture("trust-policy.json")) else {
            panic!("the seed's trust policy is not JSON");
        };
        assert_eq!(
            syntax.to_string(),
            "trust-policy.json:2:29: not valid JSON: key must be a string"
        );
        let trust = parse("trust.json", &fixture("trust-policy.fixed-json.json")).unwrap();
        assert_eq!(
            (bucket.kind, trust.kind, role.kind),
            (Kind::Bucket, Kind::Trust, Kind::Identity)
        );
        let found: Vec<String> = lint(&[bucket, trust, role], Some(&s))
            .iter()
            .map(ToString::to_string)
            .collect();
        for needle in [
            // bucket policy: Jenny's account id, foo* / fighters* too wide,
            // an ACL permission nothing needs, and the mismatch with the role policy
            "bucket-policy.json:Statement[0].Principal.AWS: account id \"8675309\" is not 12 digits",
            "bucket-policy.json:Statement[0].Principal: does not name the role putonly assumes",
            "bucket-policy.json:Statement[0].Resource[0]: \"arn:aws:s3:::account-b-bucket/foo*\" exceeds",
            "bucket-policy.json:Statement[0].Resource[1]: \"arn:aws:s3:::account-b-bucket/fighters*\" exceeds",
            "bucket-policy.json:Statement[0].Action[1]: s3:PutObjectAcl is not needed",
            "bucket-policy.json:Statement[0].Resource[0]: bucket policy grants \"foo*\" but the role policy (role-policy.json:Statement[0].Resource[0]) grants \"foo/*\"",
            // trust policy: a service principal, the account id
            "trust.json:Statement[0].Principal.Service: service principal \"s3.amazonaws.com\" is not needed",
            "trust.json:Statement[0].Principal.AWS: account id \"8675309\" is not 12 digits",
            // role policy: the ACL permission
            "role-policy.json:Statement[0].Action[1]: s3:PutObjectAcl is not needed",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(needle)),
                "{needle}\n{found:#?}"
            );
        }
        assert_eq!(found.len(), 10, "{found:#?}");
    }

    #[test]
    fn broad_actions_and_wildcard_principals_are_found() {
        let s = settings(SEED_CONFIG);
        let doc = json!({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": "*"},
            "Action": ["s3:GetObject", "s3:*", "s3:ListBucket"],
            "Resource": ["arn:aws:s3:::account-b-bucket/foo/sub/*", "arn:aws:s3:::other/foo/*"]
        }, {
            "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:role/r"},
            "Action": "s3:PutObject",
            "Resource": "arn:aws:s3:::account-b-bucket/*"
        }]});
        let found = lint(&[parsed("b.json", &doc)], Some(&s));
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        for needle in [
            "Principal.AWS: \"*\"",
            "Action[0]: \"s3:GetObject\" grants more",
            "Action[1]: \"s3:*\" grants more",
            "Action[2]: \"s3:ListBucket\" grants more",
            "Statement[0].Resource[0]: \"arn:aws:s3:::account-b-bucket/foo/sub/*\" does not cover",
            "Statement[0].Resource[1]: names bucket \"other\"",
            "Statement[1].Resource: \"arn:aws:s3:::account-b-bucket/*\" exceeds",
        ] {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle}: {text:#?}"
            );
        }
    }
}

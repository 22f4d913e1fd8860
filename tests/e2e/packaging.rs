//! Packaging artefacts that can be checked without a package manager or a
//! cluster: the systemd unit (systemd-analyze verify), the notify protocol
//! the unit relies on (in agent.rs), the DaemonSet's embedded configuration,
//! the man page and the completions generated from the CLI.

use crate::support::{putonly, repo, run, tool_path};

/// The unit grants CAP_LEASE and no other capability, and its system-call
/// filter lets through what read leases and link-free opens need.
#[test]
fn the_unit_grants_cap_lease_only_and_its_filter_allows_leases() {
    let unit = std::fs::read_to_string(repo().join("packaging/systemd/putonly.service")).unwrap();
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(values("CapabilityBoundingSet"), vec!["CAP_LEASE"]);
    assert_eq!(values("AmbientCapabilities"), vec!["CAP_LEASE"]);
    assert_eq!(values("NoNewPrivileges"), vec!["yes"]);
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED (filter part): systemd-analyze is not installed");
        return;
    }
    fn expand(group: &str, out: &mut std::collections::BTreeSet<String>) {
        let listing = std::process::Command::new("systemd-analyze")
            .args(["syscall-filter", group])
            .output()
            .expect("systemd-analyze syscall-filter");
        for line in String::from_utf8_lossy(&listing.stdout).lines().skip(1) {
            let name = line.trim();
            if name.is_empty() || name.starts_with('#') {
                continue;
            }
            if name.starts_with('@') {
                expand(name, out);
            } else {
                out.insert(name.to_string());
            }
        }
    }
    let mut allowed = std::collections::BTreeSet::new();
    let mut removed = std::collections::BTreeSet::new();
    for filter in values("SystemCallFilter") {
        match filter.strip_prefix('~') {
            Some(groups) => groups
                .split_whitespace()
                .for_each(|g| expand(g, &mut removed)),
            None => filter
                .split_whitespace()
                .for_each(|g| expand(g, &mut allowed)),
        }
    }
    for needed in [
        "fcntl",        // F_SETLEASE, F_GETLEASE
        "rt_sigaction", // the SIGIO handler
        "openat2",      // opening beneath a watch, no links
        "openat",
        "renameat2", // RENAME_NOREPLACE
        "unlinkat",
        "newfstatat",
        "statfs",
        "inotify_init1",     // the kernel's file events
        "inotify_add_watch", // a watch per folder, by descriptor
        "inotify_rm_watch",
        "getdents64", // walks list folders from their descriptors
    ] {
        assert!(
            allowed.contains(needed) && !removed.contains(needed),
            "the unit's SystemCallFilter does not let {needed} through"
        );
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let out = std::process::Command::new(repo().join("packaging/verify-unit.sh"))
        .arg(env!("CARGO_BIN_EXE_putonly"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The configuration inside the DaemonSet example is a valid putonly
/// configuration, its per-node prefix expands from NODE_NAME, and its
/// NetworkPolicy lets only selected monitoring pods reach the metrics port.
#[tokio::test]
async fn the_daemonset_configuration_is_valid_and_per_node() {
    let python = tool_path("PUTONLY_MOTO_SERVER").with_file_name("python");
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("agent.toml");
    let script = "import sys, yaml\n\
        docs = list(yaml.safe_load_all(open(sys.argv[1])))\n\
        kinds = [d['kind'] for d in docs]\n\
        assert 'DaemonSet' in kinds, kinds\n\
        cm = next(d for d in docs if d['kind'] == 'ConfigMap')\n\
        open(sys.argv[2], 'w').write(cm['data']['agent.toml'])\n\
        ds = next(d for d in docs if d['kind'] == 'DaemonSet')\n\
        pod = ds['spec']['template']['spec']\n\
        scs = [c['securityContext'] for c in pod['containers'] + pod.get('initContainers', [])]\n\
        assert all(sc['capabilities'] == {'drop': ['ALL'], 'add': ['LEASE']} for sc in scs), scs\n\
        assert all(sc['allowPrivilegeEscalation'] is False for sc in scs), scs\n\
        assert pod['automountServiceAccountToken'] is False, 'no API token in the pod'\n\
        sa = next(d for d in docs if d['kind'] == 'ServiceAccount')\n\
        assert sa['metadata']['name'] == pod['serviceAccountName'], sa\n\
        assert sa['automountServiceAccountToken'] is False, sa\n\
        images = [c['image'] for c in pod['containers'] + pod.get('initContainers', [])]\n\
        assert all('@sha256:' in i for i in images), ('images by digest', images)\n\
        inits = pod.get('initContainers', [])\n\
        assert all(c.get('securityContext', {}).get('runAsNonRoot') for c in inits), inits\n\
        np = next(d for d in docs if d['kind'] == 'NetworkPolicy')['spec']\n\
        assert np['podSelector']['matchLabels'] == ds['spec']['selector']['matchLabels'], np\n\
        assert np['policyTypes'] == ['Ingress'], np\n\
        [rule] = np['ingress']\n\
        assert rule['ports'] == [{'protocol': 'TCP', 'port': 9464}], rule\n\
        [peer] = rule['from']\n\
        assert set(peer) == {'namespaceSelector', 'podSelector'}, peer\n\
        assert all(peer[k]['matchLabels'] for k in peer), peer\n";
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .arg(repo().join("packaging/kubernetes/daemonset.yaml"))
        .arg(&config)
        .output()
        .expect("python with PyYAML from the moto install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The node's folders, moved into the temporary folder.
    let outbox = work.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "\"/srv/outbox\"",
            &format!("{:?}", outbox.display().to_string()),
        )
        .replace(
            "\"/var/lib/putonly\"",
            &format!("{:?}", work.path().join("state").display().to_string()),
        );
    std::fs::write(&config, text).unwrap();
    let out = run(putonly(None)
        .env("NODE_NAME", "node-a")
        .args(["check", "--offline", "--config"])
        .arg(&config))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("files go to fleet/node-a/"), "{stdout}");
    // Listening on the pod's every interface is named, with the way out.
    assert!(
        stdout.contains("[warn] metrics.listen") && stdout.contains("NetworkPolicy"),
        "{stdout}"
    );
    // Without NODE_NAME the configuration names what is missing.
    let out = run(putonly(None)
        .args(["check", "--offline", "--config"])
        .arg(&config))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NODE_NAME is not set"));
}

#[tokio::test]
async fn man_page_and_completions_come_from_the_cli() {
    let out = run(putonly(None).arg("man")).await;
    assert_eq!(out.status.code(), Some(0));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH putonly 1"),
        "roff"
    );
    for section in [
        "PUTONLY PUSH",
        "PUTONLY RUN",
        "PUTONLY CHECK",
        "PUTONLY POLICY",
        "probe\\-write",
    ] {
        assert!(
            page.contains(section),
            "{section} missing from the man page"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = run(putonly(None).args(["completions", shell])).await;
        assert_eq!(out.status.code(), Some(0));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("putonly") && script.contains("probe-write"),
            "{shell}"
        );
    }
}

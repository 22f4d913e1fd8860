//! What happens to a file once it is in the bucket and recorded done:
//! `after_upload = "delete"` or `"move"`, acting only on the version that was
//! uploaded.
//!
//! Neither removes nor moves a path it only looked at. The file's name is
//! first *claimed*: renamed to a private hidden name in the same folder
//! (`.putonly-claim-ID-RANDOM`), which the caller has recorded durably in
//! the journal beforehand, so that a crash in the middle is repaired at the
//! next start ([`recover`]). The inode under the private name is then
//! checked against the open file that was uploaded, the file against the
//! uploaded version (and, after the rename, against the ctime the rename
//! itself gave it), and the read lease (if held) against a writer that
//! opened it by its old name meanwhile. Only then is the private name
//! removed, or moved beneath `move_to`: folders made there one by one, no
//! link followed, no file replaced (a taken name gets a `.N` suffix);
//! across filesystems the bytes are copied from the open file into a hidden
//! temporary file, synced, checked again, and only then given their name
//! and the source removed. Anything else puts the name back (never
//! replacing a newer file of that name: it goes beside it) and leaves the
//! file, a new version, to be sent. Where the filesystem has no
//! `RENAME_NOREPLACE` (NFS, some FUSE), a hard link and an unlink stand in
//! for it. This module never deletes or moves a file whose upload is not
//! recorded done (its caller's rule), never follows a symbolic link below
//! the watched folder or `move_to`, and never talks to the network.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path};
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::ground::FileVersion;
use crate::watch::files;
use crate::watch::lease::Lease;

/// What became of a file after its upload.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done as configured.
    Done,
    /// Left in place: it is no longer the version that was uploaded (it
    /// will be sent as a new one), with the reason.
    Kept(String),
}

/// What an action did, and, when it renamed the uploaded file away and
/// back unchanged (an error after the claim), the ctime that round trip
/// gave it: the journal may follow it, so the file is not sent again for
/// that alone.
#[derive(Debug)]
pub struct Report {
    pub result: std::io::Result<Outcome>,
    pub restored_ctime: Option<i64>,
    /// The file is still under its private claim name (it could not be put
    /// back): the claim must stay on record for a later recovery.
    pub claim_left: bool,
}

/// The uploaded file an action applies to.
pub struct Uploaded<'a> {
    /// The watched folder, and the file's path relative to it.
    pub root: &'a Path,
    pub rel: &'a Path,
    /// The file as it was opened and sent, and its version.
    pub file: &'a File,
    pub version: FileVersion,
    /// The read lease held since the file was taken, if any.
    pub lease: Option<&'a Lease>,
    /// The private name ([`claim_name`]), recorded in the journal.
    pub claim: &'a str,
}

/// How long a claimed file is watched for a writer who looked its old name
/// up just before the rename, before it is removed or moved.
const SETTLE_AFTER_CLAIM: Duration = Duration::from_millis(20);

pub use crate::ground::CLAIM_PREFIX;

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

/// A private name for journal record `id`'s file while its action runs
/// (random, so no one can put a file in its way beforehand).
pub fn claim_name(id: i64) -> String {
    format!("{CLAIM_PREFIX}{id}-{:08x}", fastrand::u32(..))
}

/// Renames without replacing anything; where the filesystem has no
/// `RENAME_NOREPLACE` (EINVAL: NFS, some FUSE), a hard link (which never
/// replaces) and an unlink of the old name.
///
/// Where neither can be had (a FUSE filesystem without hard links, or one
/// the agent may not link: `fs.protected_hardlinks`), answers ENOTSUP and
/// leaves the caller to choose a name no one else uses.
fn rename_noreplace(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> Result<(), Errno> {
    match rustix::fs::renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL) => {
            match rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty()) {
                Ok(()) => {}
                Err(Errno::PERM | Errno::NOTSUP | Errno::NOSYS | Errno::MLINK) => {
                    return Err(Errno::NOTSUP);
                }
                Err(e) => return Err(e),
            }
            rustix::fs::unlinkat(from_dir, from, AtFlags::empty())
        }
        other => other,
    }
}

/// A name no one else uses in a folder: `putonly-kept-RANDOM-NAME`
/// (the name cut to fit), for a file put back where no rename can refuse
/// to replace.
fn unique_name(name: &OsStr) -> OsString {
    use std::os::unix::ffi::OsStrExt;
    let mut s = OsString::from(format!("putonly-kept-{:08x}-", fastrand::u32(..)));
    let bytes = name.as_bytes();
    s.push(OsStr::from_bytes(&bytes[..bytes.len().min(200)]));
    s
}

/// The folders `folders` beneath `dir`, made where missing (mode 0755) and
/// opened one by one without following a link.
fn make_folders_beneath(dir: OwnedFd, folders: &Path) -> std::io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = dir;
    for c in folders.components() {
        let Component::Normal(name) = c else {
            return Err(std::io::Error::other(
                "a path component leads out of the folder",
            ));
        };
        match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io(e)),
        }
        dir = rustix::fs::openat(&dir, name, flags, Mode::empty()).map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => std::io::Error::other(format!(
                "{name:?} is a symbolic link or not a folder; links are never followed"
            )),
            e => io(e),
        })?;
    }
    Ok(dir)
}

/// The folder holding `rel`, opened beneath `root` without following links.
fn parent_beneath(root: &Path, rel: &Path) -> std::io::Result<OwnedFd> {
    let root_fd = files::open_root(root)?;
    Ok(files::folder_beneath(
        root_fd,
        rel.parent().unwrap_or(Path::new("")),
    )?)
}

/// The folder `rel`'s copy goes to beneath `to` (made where missing; the
/// configured `to` itself too).
fn destination(to: &Path, rel: &Path) -> std::io::Result<OwnedFd> {
    std::fs::create_dir_all(to)
        .map_err(|e| std::io::Error::other(format!("move_to {}: {e}", to.display())))?;
    let dest_root = files::open_root(to)
        .map_err(|e| std::io::Error::other(format!("move_to {}: {e}", to.display())))?;
    make_folders_beneath(dest_root, rel.parent().unwrap_or(Path::new("")))
}

/// Whether a file can be made in `dir` (a probe made and removed): checked
/// before a claim, so that a `move_to` that cannot take files (read-only,
/// no permission, out of inodes) leaves the file untouched.
fn writable(dir: &OwnedFd) -> std::io::Result<()> {
    let probe = format!(".putonly-probe-{:08x}", fastrand::u32(..));
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, probe.as_str(), flags, Mode::from_raw_mode(0o600))
        .map_err(|e| std::io::Error::other(format!("move_to cannot take files: {e}")))?;
    drop(fd);
    rustix::fs::unlinkat(dir, probe.as_str(), AtFlags::empty()).map_err(io)
}

/// Names tried for a file in `move_to`: `a.csv`, then `a.csv.1` to
/// `a.csv.99`, then random ones (`a.csv.3f9a0c1e`): a name produced every
/// minute for years still finds a free one at once.
const NUMBERED: usize = 100;
const TRIES: usize = NUMBERED + 100;

/// The `n`th name tried for `name` (see [`NUMBERED`]).
fn numbered(name: &OsStr, n: usize) -> OsString {
    let mut s = name.to_os_string();
    match n {
        0 => {}
        n if n < NUMBERED => s.push(format!(".{n}")),
        _ => s.push(format!(".{:08x}", fastrand::u32(..))),
    }
    s
}

/// Puts `private` back under `name`, or beside a newer file of that name
/// (`name.putonly-kept-N`, or `putonly-kept-N-PRIVATE` where that name
/// would be too long); never replaces anything.
fn put_back(dir: BorrowedFd<'_>, private: &str, name: &OsStr) -> std::io::Result<()> {
    let mut long_ok = true;
    let mut n = 0;
    while n <= 100 {
        let target = match n {
            0 => name.to_os_string(),
            _ if long_ok => {
                let mut t = name.to_os_string();
                t.push(format!(".putonly-kept-{n}"));
                t
            }
            _ => OsString::from(format!(
                "putonly-kept-{n}-{}",
                private.trim_start_matches(CLAIM_PREFIX)
            )),
        };
        match rename_noreplace(dir, OsStr::new(private), dir, &target) {
            Ok(()) => return Ok(()),
            Err(Errno::EXIST) => n += 1,
            // The same number again, under the short name.
            Err(Errno::NAMETOOLONG) if long_ok && n > 0 => long_ok = false,
            // No way to refuse a replace here: a name no one else uses.
            Err(Errno::NOTSUP) => {
                let unique = unique_name(name);
                tracing::warn!(name = ?name, kept_as = ?unique, "this filesystem cannot rename without replacing: the file is put back under a name of its own");
                return rustix::fs::renameat(dir, private, dir, &unique).map_err(io);
            }
            Err(e) => return Err(io(e)),
        }
    }
    Err(std::io::Error::other(format!(
        "cannot put it back: 100 names taken; it is still under {private}"
    )))
}

/// The content of a version, without its ctime (a rename changes that).
fn content(v: FileVersion) -> (u64, u64, u64, i64) {
    (v.dev, v.ino, v.size, v.mtime_ns)
}

/// A claimed file: its folder, its name, its private name, and the ctime
/// the claim's own rename gave it.
struct Claimed {
    dir: OwnedFd,
    name: OsString,
    private: String,
    ctime: i64,
}

/// Why the claimed file must not be acted on, if it must not: a writer
/// opened it (the lease), or it changed since the claim (content, or a
/// ctime other than the one the claim's rename gave it).
fn still_uploaded(u: &Uploaded<'_>, c: &Claimed) -> Option<String> {
    if u.lease.is_some_and(|l| l.is_broken()) {
        return Some("a process opened it for writing".into());
    }
    let now = u.file.metadata().map(|m| FileVersion::of(&m));
    match now {
        Ok(v) if content(v) == content(u.version) && v.ctime_ns == c.ctime => None,
        _ => Some("it changed after its upload".into()),
    }
}

/// Puts a claimed file back after an error, and says which ctime the round
/// trip gave it when nothing else changed: its content is the uploaded one,
/// its ctime was the claim's own until the put-back, and no writer broke
/// the lease (if one is held).
fn restore(u: &Uploaded<'_>, c: &Claimed) -> std::io::Result<Option<i64>> {
    let untouched = still_uploaded(u, c).is_none();
    put_back(c.dir.as_fd(), &c.private, &c.name)?;
    let unbroken = !u.lease.is_some_and(|l| l.is_broken());
    let now = u.file.metadata().map(|m| FileVersion::of(&m)).ok();
    Ok(now
        .filter(|v| untouched && unbroken && content(*v) == content(u.version))
        .map(|v| v.ctime_ns))
}

/// Claims the uploaded file (see the module doc): `Ok(Err(reason))` when
/// it is not (or no longer) the uploaded version and was left in place.
fn claim(u: &Uploaded<'_>) -> std::io::Result<Result<Claimed, String>> {
    let Some(name) = u.rel.file_name() else {
        return Err(std::io::Error::other("no file name"));
    };
    // The whole version first (ctime included), on the open file: the
    // rename below changes the ctime.
    if u.file.metadata().map(|m| FileVersion::of(&m)).ok() != Some(u.version) {
        return Ok(Err("it changed after its upload".into()));
    }
    let dir = parent_beneath(u.root, u.rel)?;
    let private = OsStr::new(u.claim);
    match rustix::fs::renameat_with(&dir, name, &dir, private, RenameFlags::NOREPLACE) {
        Ok(()) => {}
        // No RENAME_NOREPLACE here: the private name is ours to replace.
        Err(Errno::INVAL) => rustix::fs::renameat(&dir, name, &dir, private).map_err(io)?,
        Err(Errno::NOENT) => return Ok(Err("it was gone already".into())),
        Err(e) => return Err(io(e)),
    }
    // Whatever the rename took is under the private name now: is it ours?
    let st = rustix::fs::statat(&dir, private, AtFlags::SYMLINK_NOFOLLOW);
    let mut claimed = Claimed {
        dir,
        name: name.to_os_string(),
        private: u.claim.to_string(),
        ctime: i64::MIN,
    };
    let why = match st {
        Err(e) => Some(format!("cannot look at it after the claim: {e}")),
        Ok(st) if (st.st_dev, st.st_ino) != (u.version.dev, u.version.ino) => {
            Some("another file had taken its name".into())
        }
        Ok(_) => {
            claimed.ctime = u
                .file
                .metadata()
                .map(|m| FileVersion::of(&m).ctime_ns)
                .unwrap_or(i64::MIN);
            std::thread::sleep(SETTLE_AFTER_CLAIM);
            still_uploaded(u, &claimed)
        }
    };
    match why {
        None => Ok(Ok(claimed)),
        Some(why) => {
            put_back(claimed.dir.as_fd(), &claimed.private, &claimed.name)?;
            Ok(Err(why))
        }
    }
}

/// Deletes the uploaded file if it is still the uploaded version and no
/// writer opened it.
pub fn delete(u: &Uploaded<'_>) -> Report {
    let c = match claim(u) {
        Ok(Ok(c)) => c,
        Ok(Err(why)) => return Report::kept(why),
        Err(e) => return Report::failed(e, None),
    };
    match rustix::fs::unlinkat(&c.dir, c.private.as_str(), AtFlags::empty()) {
        Ok(()) => Report::done(),
        Err(e) => Report::after_error(io(e), restore(u, &c)),
    }
}

impl Report {
    fn done() -> Self {
        Report {
            result: Ok(Outcome::Done),
            restored_ctime: None,
            claim_left: false,
        }
    }
    fn kept(why: String) -> Self {
        Report {
            result: Ok(Outcome::Kept(why)),
            restored_ctime: None,
            claim_left: false,
        }
    }
    fn failed(e: std::io::Error, restored_ctime: Option<i64>) -> Self {
        Report {
            result: Err(e),
            restored_ctime,
            claim_left: false,
        }
    }
    /// An error after the claim, and how putting the file back went.
    fn after_error(e: std::io::Error, restored: std::io::Result<Option<i64>>) -> Self {
        match restored {
            Ok(ctime) => Report::failed(e, ctime),
            Err(again) => Report {
                result: Err(std::io::Error::other(format!(
                    "{e}; and putting it back failed: {again}"
                ))),
                restored_ctime: None,
                claim_left: true,
            },
        }
    }
}

/// Moves the uploaded file to the same relative path beneath `to`, if it
/// is still the uploaded version and no writer opened it. Never replaces a
/// file there: a taken name gets a `.N` suffix.
pub fn move_into(u: &Uploaded<'_>, to: &Path) -> Report {
    // Ready before the claim: a move_to that cannot take it leaves the file
    // untouched.
    let dest = match destination(to, u.rel).and_then(|d| writable(&d).map(|()| d)) {
        Ok(d) => d,
        Err(e) => return Report::failed(e, None),
    };
    let c = match claim(u) {
        Ok(Ok(c)) => c,
        Ok(Err(why)) => return Report::kept(why),
        Err(e) => return Report::failed(e, None),
    };
    match move_claimed(u, &c, &dest) {
        Ok(Outcome::Done) => Report::done(),
        Ok(Outcome::Kept(why)) => match put_back(c.dir.as_fd(), &c.private, &c.name) {
            Ok(()) => Report::kept(why),
            Err(e) => Report::after_error(std::io::Error::other(why), Err(e)),
        },
        Err(e) => Report::after_error(e, restore(u, &c)),
    }
}

fn move_claimed(u: &Uploaded<'_>, c: &Claimed, dest: &OwnedFd) -> std::io::Result<Outcome> {
    for n in 0..TRIES {
        let target = numbered(&c.name, n);
        match rename_noreplace(c.dir.as_fd(), OsStr::new(&c.private), dest.as_fd(), &target) {
            Ok(()) => return Ok(Outcome::Done),
            Err(Errno::EXIST) => continue,
            Err(Errno::XDEV) => return copy_across(u, c, dest),
            // No atomic no-replace in move_to: a name seen free there (the
            // administrator's folder) is taken at once.
            Err(Errno::NOTSUP) => {
                if rustix::fs::statat(dest, &target, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                    continue;
                }
                rustix::fs::renameat(&c.dir, c.private.as_str(), dest, &target).map_err(io)?;
                return Ok(Outcome::Done);
            }
            Err(e) => return Err(io(e)),
        }
    }
    Err(std::io::Error::other("no free name in move_to"))
}

/// Across filesystems: the uploaded bytes are copied from the open file
/// into a hidden temporary file beneath `dest` (never through a link),
/// synced; if the source is still the uploaded version the copy gets its
/// name (never replacing a file: a `.N` suffix), the folder is synced and
/// the source removed; else the copy is removed.
fn copy_across(u: &Uploaded<'_>, c: &Claimed, dest: &OwnedFd) -> std::io::Result<Outcome> {
    let mode = u
        .file
        .metadata()
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o600);
    let temp = format!(
        ".putonly-copy-{}",
        c.private.trim_start_matches(CLAIM_PREFIX)
    );
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let out = File::from(
        rustix::fs::openat(dest, temp.as_str(), flags, Mode::from_raw_mode(mode)).map_err(io)?,
    );
    let remove_temp = || {
        let _ = rustix::fs::unlinkat(dest, temp.as_str(), AtFlags::empty());
    };
    if let Err(e) = copy_to(u.file, &out, u.version.size).and_then(|()| out.sync_all()) {
        remove_temp();
        return Err(e);
    }
    if let Some(why) = still_uploaded(u, c) {
        remove_temp();
        return Ok(Outcome::Kept(why));
    }
    let mut named = false;
    for n in 0..TRIES {
        let target = numbered(&c.name, n);
        match rename_noreplace(dest.as_fd(), OsStr::new(&temp), dest.as_fd(), &target) {
            Ok(()) => {
                named = true;
                break;
            }
            Err(Errno::EXIST) => continue,
            Err(Errno::NOTSUP) => {
                if rustix::fs::statat(dest, &target, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                    continue;
                }
                if let Err(e) = rustix::fs::renameat(dest, temp.as_str(), dest, &target) {
                    remove_temp();
                    return Err(io(e));
                }
                named = true;
                break;
            }
            Err(e) => {
                remove_temp();
                return Err(io(e));
            }
        }
    }
    if !named {
        remove_temp();
        return Err(std::io::Error::other("no free name in move_to"));
    }
    let dir = rustix::fs::openat(
        dest,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    rustix::fs::fsync(&dir).map_err(io)?;
    rustix::fs::unlinkat(&c.dir, c.private.as_str(), AtFlags::empty()).map_err(io)?;
    Ok(Outcome::Done)
}

/// Copies `len` bytes of `from` (from its start) into `to`.
fn copy_to(from: &File, mut to: &File, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let want = buf.len().min((len - offset) as usize);
        let n = from.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(std::io::Error::other("the file became shorter"));
        }
        to.write_all(&buf[..n])?;
        offset += n as u64;
    }
    Ok(())
}

/// After a crash, or an action whose put-back failed: a file left under
/// its private claim name `private` (path `rel` beneath `root`) is put back
/// under its name, or beside a newer file of that name. Returns whether
/// there was one.
pub fn recover(root: &Path, rel: &Path, private: &str) -> std::io::Result<bool> {
    let Some(name) = rel.file_name() else {
        return Ok(false);
    };
    let dir = parent_beneath(root, rel)?;
    match rustix::fs::statat(&dir, private, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(io(e)),
        Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() => Ok(false),
        Ok(_) => {
            put_back(dir.as_fd(), private, name)?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::lease::{Leases, Take};

    fn uploaded(path: &Path) -> (File, FileVersion) {
        let f = File::open(path).unwrap();
        let v = FileVersion::of(&f.metadata().unwrap());
        (f, v)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn outcome(r: Report) -> Outcome {
        r.result.unwrap()
    }

    #[test]
    fn deletes_the_uploaded_version_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let p = root.join("sub/a.csv");
        let rel = Path::new("sub/a.csv");
        std::fs::write(&p, b"v1").unwrap();
        let claim = claim_name(7);
        let u = |file, version| Uploaded {
            root,
            rel,
            file,
            version,
            lease: None,
            claim: &claim,
        };
        let (file, version) = uploaded(&p);
        assert_eq!(outcome(delete(&u(&file, version))), Outcome::Done);
        assert!(!p.exists());

        // Renamed over by a new version: that one stays, under its name.
        std::fs::write(&p, b"v1").unwrap();
        let (file, version) = uploaded(&p);
        std::fs::write(root.join("sub/new"), b"v2").unwrap();
        std::fs::rename(root.join("sub/new"), &p).unwrap();
        let out = outcome(delete(&u(&file, version)));
        assert!(matches!(out, Outcome::Kept(_)), "{out:?}");
        assert_eq!(std::fs::read(&p).unwrap(), b"v2");

        // Appended to after the upload: kept.
        let (file, version) = uploaded(&p);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut w| std::io::Write::write_all(&mut w, b"+"))
            .unwrap();
        let out = outcome(delete(&u(&file, version)));
        assert!(matches!(out, Outcome::Kept(_)), "{out:?}");
        assert_eq!(std::fs::read(&p).unwrap(), b"v2+");
        assert_eq!(
            names(&root.join("sub")),
            vec!["a.csv"],
            "no private name left"
        );
    }

    #[tokio::test]
    async fn a_writer_opening_it_during_the_delete_keeps_it_and_writes_into_it() {
        let leases = Leases::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let p = root.join("f");
        std::fs::write(&p, b"uploaded").unwrap();
        let (file, version) = uploaded(&p);
        let file = std::sync::Arc::new(file);
        let Take::Held(lease) = leases.take(&file) else {
            panic!("no lease")
        };
        // A writer opens it by name just before the delete: its open waits
        // for the lease, which the delete sees broken.
        let writer_path = p.clone();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut w = std::fs::OpenOptions::new()
                .append(true)
                .open(writer_path)
                .unwrap();
            w.write_all(b" and more").unwrap();
        });
        tokio::time::timeout(Duration::from_secs(5), lease.broken())
            .await
            .unwrap();
        let report = tokio::task::spawn_blocking(move || {
            delete(&Uploaded {
                root: &root,
                rel: Path::new("f"),
                file: &file,
                version,
                lease: Some(&lease),
                claim: &claim_name(1),
            })
        })
        .await
        .unwrap();
        assert!(
            report.restored_ctime.is_none(),
            "a broken lease: no ctime to follow"
        );
        let out = outcome(report);
        assert!(matches!(out, Outcome::Kept(_)), "{out:?}");
        writer.join().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"uploaded and more");
    }

    #[test]
    fn moves_beneath_move_to_without_replacing_or_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let (root, sent) = (dir.path().join("out"), dir.path().join("sent"));
        std::fs::create_dir_all(root.join("d")).unwrap();
        let rel = Path::new("d/a.csv");
        for (i, body) in ["first", "second"].iter().enumerate() {
            std::fs::write(root.join(rel), body).unwrap();
            let (file, version) = uploaded(&root.join(rel));
            let claim = claim_name(i as i64);
            let u = Uploaded {
                root: &root,
                rel,
                file: &file,
                version,
                lease: None,
                claim: &claim,
            };
            assert_eq!(outcome(move_into(&u, &sent)), Outcome::Done);
        }
        assert_eq!(names(&sent.join("d")), vec!["a.csv", "a.csv.1"]);
        assert_eq!(std::fs::read(sent.join("d/a.csv")).unwrap(), b"first");
        assert_eq!(std::fs::read(sent.join("d/a.csv.1")).unwrap(), b"second");
        assert!(names(&root.join("d")).is_empty());

        // A link planted in move_to is not followed: the file stays.
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, sent.join("e")).unwrap();
        std::fs::create_dir_all(root.join("e")).unwrap();
        std::fs::write(root.join("e/b"), b"b").unwrap();
        let (file, version) = uploaded(&root.join("e/b"));
        let claim = claim_name(9);
        let u = Uploaded {
            root: &root,
            rel: Path::new("e/b"),
            file: &file,
            version,
            lease: None,
            claim: &claim,
        };
        assert!(move_into(&u, &sent).result.is_err());
        assert_eq!(std::fs::read(root.join("e/b")).unwrap(), b"b", "untouched");
        assert!(names(&outside).is_empty());
    }

    #[test]
    fn a_name_moved_again_and_again_always_finds_a_free_one() {
        let dir = tempfile::tempdir().unwrap();
        let (root, sent) = (dir.path().join("out"), dir.path().join("sent"));
        std::fs::create_dir_all(&root).unwrap();
        let n = NUMBERED + 50;
        for i in 0..n {
            std::fs::write(root.join("latest.csv"), i.to_string()).unwrap();
            let (file, version) = uploaded(&root.join("latest.csv"));
            let claim = claim_name(i as i64);
            let u = Uploaded {
                root: &root,
                rel: Path::new("latest.csv"),
                file: &file,
                version,
                lease: None,
                claim: &claim,
            };
            assert_eq!(outcome(move_into(&u, &sent)), Outcome::Done, "move {i}");
        }
        assert_eq!(names(&sent).len(), n);
    }

    #[test]
    fn a_copy_across_filesystems_is_named_only_once_complete() {
        // /dev/shm is a tmpfs: another filesystem than the temp folder.
        let Ok(sent) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("big"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(sent.path().join("big"), b"an older one").unwrap();
        let (file, version) = uploaded(&root.join("big"));
        let claim = claim_name(4);
        let u = Uploaded {
            root,
            rel: Path::new("big"),
            file: &file,
            version,
            lease: None,
            claim: &claim,
        };
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(root).unwrap().dev() == std::fs::metadata(sent.path()).unwrap().dev() {
            eprintln!("skipped: /dev/shm is on the same filesystem");
            return;
        }
        assert_eq!(outcome(move_into(&u, sent.path())), Outcome::Done);
        assert_eq!(
            names(sent.path()),
            vec!["big", "big.1"],
            "no temporary left"
        );
        assert_eq!(
            std::fs::read(sent.path().join("big.1")).unwrap(),
            vec![7u8; 3 << 20]
        );
        assert!(names(root).is_empty());
    }

    #[test]
    fn a_claim_left_by_a_crash_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let private = claim_name(5);
        std::fs::write(root.join(&private), b"claimed").unwrap();
        std::fs::write(root.join("x"), b"a newer x").unwrap();
        assert!(recover(root, Path::new("x"), &private).unwrap());
        assert!(
            !recover(root, Path::new("x"), &private).unwrap(),
            "nothing left"
        );
        assert_eq!(names(root), vec!["x", "x.putonly-kept-1"]);
        // A name too long for the suffix goes beside it under a short one.
        let long = "l".repeat(250);
        std::fs::write(root.join(&private), b"claimed").unwrap();
        std::fs::write(root.join(&long), b"newer").unwrap();
        assert!(recover(root, Path::new(&long), &private).unwrap());
        assert!(
            names(root).iter().any(|n| n.starts_with("putonly-kept-1-")),
            "{:?}",
            names(root)
        );
    }

    #[test]
    fn a_link_in_the_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("d")).unwrap();
        let (file, version) = uploaded(&outside.path().join("secret"));
        let claim = claim_name(3);
        let u = Uploaded {
            root: dir.path(),
            rel: Path::new("d/secret"),
            file: &file,
            version,
            lease: None,
            claim: &claim,
        };
        assert!(delete(&u).result.is_err());
        assert!(outside.path().join("secret").exists());
    }
}

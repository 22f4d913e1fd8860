//! What happens to a file once it is in the bucket and recorded done:
//! `after_upload = "delete"` or `"move"`, acting only on the version that was
//! uploaded.
//!
//! Neither removes nor moves a path it only looked at. The file's name is
//! first *claimed*: renamed (no replace) to a private hidden name in the
//! same folder, `.putonly-claim-ID` after its journal record, which the
//! caller has recorded beforehand so that a crash in the middle is repaired
//! at the next start ([`recover`]). The inode under the private name is
//! then checked against the open file that was uploaded, the file against
//! the uploaded version, and the read lease (if held) against a writer that
//! opened it by its old name meanwhile. Only then is the private name
//! removed, or moved beneath `move_to` (folders made there one by one, no
//! link followed, no file replaced: a name taken gets a `.N` suffix; across
//! filesystems a new file is written, synced, and the source removed only
//! if it is still the uploaded version). Anything else puts the name back
//! (no replace, or beside a newer file of that name) and leaves the file, a
//! new version, to be sent. This module never deletes or moves a file whose
//! upload is not recorded done (its caller's rule), never follows a
//! symbolic link below the watched folder or `move_to`, and never talks to
//! the network.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path};
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::files;
use crate::lease::Lease;
use crate::upload::FileVersion;

/// What became of a file after its upload.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done as configured.
    Done,
    /// Left in place: it is no longer the version that was uploaded (it
    /// will be sent as a new one), with the reason.
    Kept(String),
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
    /// The journal record id, which names the private claim.
    pub id: i64,
}

/// How long a claimed file is watched for a writer who looked its old name
/// up just before the rename, before it is removed or moved.
const SETTLE_AFTER_CLAIM: Duration = Duration::from_millis(20);

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

/// The private name a claimed file has while its action runs.
pub fn claim_name(id: i64) -> String {
    format!(".putonly-claim-{id}")
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

/// `name` with a numeric suffix: `a.csv`, `a.csv.1`, `a.csv.2`, ...
fn numbered(name: &OsStr, n: usize) -> OsString {
    let mut s = name.to_os_string();
    if n > 0 {
        s.push(format!(".{n}"));
    }
    s
}

/// Puts `private` back under `name`, or beside a newer file of that name
/// (`name.putonly-kept-N`); never replaces anything.
fn put_back(dir: BorrowedFd<'_>, private: &str, name: &OsStr) -> std::io::Result<()> {
    for n in 0..=100 {
        let target = if n == 0 {
            name.to_os_string()
        } else {
            let mut t = name.to_os_string();
            t.push(format!(".putonly-kept-{n}"));
            t
        };
        match rustix::fs::renameat_with(dir, private, dir, &target, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(Errno::EXIST) => continue,
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

/// Why the claimed file must not be acted on, if it must not.
fn still_uploaded(u: &Uploaded<'_>) -> Option<String> {
    if u.lease.is_some_and(|l| l.is_broken()) {
        return Some("a process opened it for writing".into());
    }
    let now = u.file.metadata().map(|m| content(FileVersion::of(&m)));
    (now.ok() != Some(content(u.version))).then(|| "it changed after its upload".into())
}

/// A claimed file: its folder, its name and its private name.
struct Claimed {
    dir: OwnedFd,
    name: OsString,
    private: String,
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
    let private = claim_name(u.id);
    match rustix::fs::renameat_with(&dir, name, &dir, private.as_str(), RenameFlags::NOREPLACE) {
        Ok(()) => {}
        Err(Errno::NOENT) => return Ok(Err("it was gone already".into())),
        Err(e) => return Err(io(e)),
    }
    let claimed = Claimed {
        dir,
        name: name.to_os_string(),
        private,
    };
    // Whatever the rename took is under the private name now: is it ours?
    let st = rustix::fs::statat(
        &claimed.dir,
        claimed.private.as_str(),
        AtFlags::SYMLINK_NOFOLLOW,
    );
    let why = match st {
        Err(e) => Some(format!("cannot look at it after the claim: {e}")),
        Ok(st) if (st.st_dev, st.st_ino) != (u.version.dev, u.version.ino) => {
            Some("another file had taken its name".into())
        }
        Ok(_) => {
            std::thread::sleep(SETTLE_AFTER_CLAIM);
            still_uploaded(u)
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
pub fn delete(u: &Uploaded<'_>) -> std::io::Result<Outcome> {
    let c = match claim(u)? {
        Ok(c) => c,
        Err(why) => return Ok(Outcome::Kept(why)),
    };
    match rustix::fs::unlinkat(&c.dir, c.private.as_str(), AtFlags::empty()) {
        Ok(()) => Ok(Outcome::Done),
        Err(e) => {
            put_back(c.dir.as_fd(), &c.private, &c.name)?;
            Err(io(e))
        }
    }
}

/// Moves the uploaded file to the same relative path beneath `to`, if it
/// is still the uploaded version and no writer opened it. Never replaces a
/// file there: a taken name gets a `.N` suffix.
pub fn move_into(u: &Uploaded<'_>, to: &Path) -> std::io::Result<Outcome> {
    // Ready before the claim: a move_to that cannot take it leaves the file
    // untouched.
    let dest = destination(to, u.rel)?;
    let c = match claim(u)? {
        Ok(c) => c,
        Err(why) => return Ok(Outcome::Kept(why)),
    };
    match move_claimed(u, &c, &dest) {
        Ok(Outcome::Done) => Ok(Outcome::Done),
        Ok(Outcome::Kept(why)) => {
            put_back(c.dir.as_fd(), &c.private, &c.name)?;
            Ok(Outcome::Kept(why))
        }
        Err(e) => {
            put_back(c.dir.as_fd(), &c.private, &c.name)?;
            Err(e)
        }
    }
}

fn move_claimed(u: &Uploaded<'_>, c: &Claimed, dest: &OwnedFd) -> std::io::Result<Outcome> {
    for n in 0..1000 {
        let target = numbered(&c.name, n);
        match rustix::fs::renameat_with(
            &c.dir,
            c.private.as_str(),
            dest,
            &target,
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => return Ok(Outcome::Done),
            Err(Errno::EXIST) => continue,
            Err(Errno::XDEV) => return copy_across(u, c, dest, &target),
            Err(e) => return Err(io(e)),
        }
    }
    Err(std::io::Error::other("1000 names taken in move_to"))
}

/// Across filesystems: a new file beneath `dest` (never through a link,
/// never over a file), the uploaded bytes copied from the open file, synced
/// with its folder; the source is removed only if it is still the uploaded
/// version, else the copy is.
fn copy_across(
    u: &Uploaded<'_>,
    c: &Claimed,
    dest: &OwnedFd,
    first: &OsStr,
) -> std::io::Result<Outcome> {
    let mode = u
        .file
        .metadata()
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o600);
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let base = first.to_os_string();
    let mut made = None;
    for n in 0..1000 {
        let target = numbered(&base, n);
        match rustix::fs::openat(dest, &target, flags, Mode::from_raw_mode(mode)) {
            Ok(fd) => {
                made = Some((File::from(fd), target));
                break;
            }
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(io(e)),
        }
    }
    let Some((out, target)) = made else {
        return Err(std::io::Error::other("1000 names taken in move_to"));
    };
    let copied = copy_to(u.file, &out, u.version.size).and_then(|()| {
        out.sync_all()?;
        let dir = rustix::fs::openat(
            dest,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        rustix::fs::fsync(&dir).map_err(io)
    });
    let keep = match copied {
        Err(e) => Err(e),
        Ok(()) => Ok(still_uploaded(u)),
    };
    match keep {
        Ok(None) => {
            rustix::fs::unlinkat(&c.dir, c.private.as_str(), AtFlags::empty()).map_err(io)?;
            Ok(Outcome::Done)
        }
        other => {
            let _ = rustix::fs::unlinkat(dest, &target, AtFlags::empty());
            other.map(|why| Outcome::Kept(why.unwrap_or_default()))
        }
    }
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

/// After a crash: a file left under its private claim name (journal record
/// `id`, path `rel` beneath `root`) is put back under its name, or beside a
/// newer file of that name. Returns whether there was one.
pub fn recover(root: &Path, rel: &Path, id: i64) -> std::io::Result<bool> {
    let Some(name) = rel.file_name() else {
        return Ok(false);
    };
    let dir = parent_beneath(root, rel)?;
    let private = claim_name(id);
    match rustix::fs::statat(&dir, private.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(io(e)),
        Ok(_) => {
            put_back(dir.as_fd(), &private, name)?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{Leases, Take};

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

    #[test]
    fn deletes_the_uploaded_version_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let p = root.join("sub/a.csv");
        let rel = Path::new("sub/a.csv");
        std::fs::write(&p, b"v1").unwrap();
        let (file, version) = uploaded(&p);
        let u = |file, version| Uploaded {
            root,
            rel,
            file,
            version,
            lease: None,
            id: 7,
        };
        assert_eq!(delete(&u(&file, version)).unwrap(), Outcome::Done);
        assert!(!p.exists());

        // Renamed over by a new version: that one stays, under its name.
        std::fs::write(&p, b"v1").unwrap();
        let (file, version) = uploaded(&p);
        std::fs::write(root.join("sub/new"), b"v2").unwrap();
        std::fs::rename(root.join("sub/new"), &p).unwrap();
        let out = delete(&u(&file, version)).unwrap();
        assert!(matches!(out, Outcome::Kept(_)), "{out:?}");
        assert_eq!(std::fs::read(&p).unwrap(), b"v2");

        // Appended to after the upload: kept.
        let (file, version) = uploaded(&p);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut w| std::io::Write::write_all(&mut w, b"+"))
            .unwrap();
        let out = delete(&u(&file, version)).unwrap();
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
        let out = tokio::task::spawn_blocking(move || {
            delete(&Uploaded {
                root: &root,
                rel: Path::new("f"),
                file: &file,
                version,
                lease: Some(&lease),
                id: 1,
            })
            .unwrap()
        })
        .await
        .unwrap();
        assert!(matches!(out, Outcome::Kept(_)), "{out:?}");
        writer.join().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"uploaded and more");
    }

    #[test]
    fn moves_beneath_move_to_without_replacing_or_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let (root, sent) = (dir.path().join("out"), dir.path().join("sent"));
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir_all(&sent).unwrap();
        let rel = Path::new("d/a.csv");
        for (i, body) in ["first", "second"].iter().enumerate() {
            std::fs::write(root.join(rel), body).unwrap();
            let (file, version) = uploaded(&root.join(rel));
            let u = Uploaded {
                root: &root,
                rel,
                file: &file,
                version,
                lease: None,
                id: i as i64,
            };
            assert_eq!(move_into(&u, &sent).unwrap(), Outcome::Done);
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
        let u = Uploaded {
            root: &root,
            rel: Path::new("e/b"),
            file: &file,
            version,
            lease: None,
            id: 9,
        };
        assert!(move_into(&u, &sent).is_err());
        assert_eq!(std::fs::read(root.join("e/b")).unwrap(), b"b", "put back");
        assert!(names(&outside).is_empty());
    }

    #[test]
    fn a_claim_left_by_a_crash_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join(claim_name(5)), b"claimed").unwrap();
        std::fs::write(root.join("x"), b"a newer x").unwrap();
        assert!(recover(root, Path::new("x"), 5).unwrap());
        assert!(!recover(root, Path::new("x"), 5).unwrap(), "nothing left");
        assert_eq!(names(root), vec!["x", "x.putonly-kept-1"]);
    }

    #[test]
    fn a_link_in_the_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("d")).unwrap();
        let (file, version) = uploaded(&outside.path().join("secret"));
        let u = Uploaded {
            root: dir.path(),
            rel: Path::new("d/secret"),
            file: &file,
            version,
            lease: None,
            id: 3,
        };
        assert!(delete(&u).is_err());
        assert!(outside.path().join("secret").exists());
    }
}

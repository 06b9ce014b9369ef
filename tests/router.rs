//! The router end to end: the learned classifier through `duet classify` (its score on
//! the labelled sets, its explanation, the keyword-rule fallback and override layer),
//! and through a real server: `X-Duet-Tier`, the decision log, the SIMPLE tier's
//! generation policy and the fast model's draft (confidence-driven escalation).

mod common;
#[path = "common/server.rs"]
mod server;
use common::*;
use serde_json::{json, Value};
use server::client;
use std::process::Command;

fn duet_status(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(args)
        .current_dir(repo_root())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stdout, stderr)
}

fn duet(args: &[&str]) -> String {
    let (ok, stdout, stderr) = duet_status(args);
    assert!(ok, "duet {args:?} failed:\n{stderr}");
    stdout
}

/// The repository's models.toml with `edit` applied, written to a temporary folder.
fn config_with(edit: impl FnOnce(&mut toml::Table)) -> (tempfile::TempDir, String) {
    let text = std::fs::read_to_string(repo_root().join("models.toml")).unwrap();
    let mut t: toml::Table = toml::from_str(&text).unwrap();
    edit(&mut t);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.toml");
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    (dir, path.display().to_string())
}

fn routing(t: &mut toml::Table) -> &mut toml::Table {
    t.get_mut("routing").unwrap().as_table_mut().unwrap()
}

fn eval(args: &[&str]) -> Value {
    let out = duet(&[&["classify", "--json", "--eval"], args].concat());
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn the_learned_classifier_scores_the_labelled_sets() {
    // The shared development set and the team's held-out set were never trained on;
    // data/routing/heldout.jsonl was written apart from the training corpus.
    for (file, floor) in [
        ("tests/routing/dev.jsonl", 0.95),
        // 68/72 since the head reads static embeddings (100x cheaper than the encoder
        // pass; BENCHMARKS.md): 70/72 before, one prompt under 95% now.
        ("data/routing/heldout.jsonl", 0.94),
        ("tests/routing/heldout.jsonl", 0.90),
    ] {
        let v = eval(&[file]);
        let acc = v["accuracy"].as_f64().unwrap();
        assert!(acc >= floor, "{file}: accuracy {acc} < {floor}: {v}");
        let by = |k: &str| v["decided_by"][k].as_u64().unwrap_or(0);
        assert_eq!(
            by("learned classifier") + by("override rule"),
            v["total"].as_u64().unwrap(),
            "{file}: every decision is the learned head's or an override rule's: {v}"
        );
    }
    // The rules alone still work (the fallback).
    let v = eval(&["tests/routing/dev.jsonl", "--rules"]);
    assert_eq!(v["decided_by"]["keyword rules"], v["total"], "{v}");
}

#[test]
fn classify_explains_the_learned_decision() {
    let out = duet(&[
        "classify",
        "--json",
        "Design a plugin architecture for our editor.",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tier"], "COMPLEX", "{v}");
    assert_eq!(v["by"], "learned", "{v}");
    assert_eq!(v["model"], LARGE);
    let p: Vec<f64> = v["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{v}");
    assert_eq!(v["confidence"].as_f64().unwrap(), p[2], "{v}");
    let reasons = v["reasons"].as_array().unwrap();
    assert!(
        reasons.iter().any(|r| r
            .as_str()
            .unwrap()
            .starts_with("embedding of the instruction")),
        "{v}"
    );

    // The trap of the tier definitions: a SIMPLE activity over a whole package.
    let out = duet(&[
        "classify",
        "--json",
        "Write a tool that generates docstrings for a whole package",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tier"], "COMPLEX", "{v}");

    let out = duet(&["classify", "Add type hints: def f(x): return x"]);
    for want in [
        "tier:       SIMPLE",
        SMALL,
        "decided by: learned classifier",
        "top signals:",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn without_its_embedding_model_the_router_falls_back_to_the_rules() {
    let (_dir, path) = config_with(|t| {
        routing(t).insert("embedding".into(), "missing-model".into());
    });
    let out = duet(&[
        "--config",
        &path,
        "classify",
        "--json",
        "Add type hints: def f(x): return x",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["by"], "rules", "{v}");
    assert_eq!(v["tier"], "SIMPLE", "{v}");
    let first = v["reasons"][0].as_str().unwrap();
    assert!(
        first.starts_with("learned classifier unavailable") && first.contains("missing-model"),
        "{v}"
    );
}

#[test]
fn an_override_rule_decides_over_the_learned_head() {
    let (_dir, path) = config_with(|t| {
        let rules = routing(t).get_mut("rules").unwrap().as_array_mut().unwrap();
        let rule: toml::Table = toml::from_str(
            "name = \"security\"\ntier = \"complex\"\nweight = 5.0\noverride = true\nphrases = [\"security review\"]",
        )
        .unwrap();
        rules.push(toml::Value::Table(rule));
    });
    let ask = |prompt: &str| -> Value {
        let out = duet(&["--config", &path, "classify", "--json", prompt]);
        serde_json::from_str(out.trim()).unwrap()
    };
    let v = ask("Add a one-line comment for the security review to: x = 1");
    assert_eq!(
        (v["tier"].as_str(), v["by"].as_str()),
        (Some("COMPLEX"), Some("override")),
        "{v}"
    );
    let v = ask("Add a one-line comment to: x = 1");
    assert_eq!(v["by"], "learned", "{v}");
}

#[test]
fn features_are_dumped_for_training_and_bad_lines_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"Rename x to y\", \"tier\": \"simple\"}\n\n{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": \"Design a queue\"}], \"num_predict\": 50}\n",
    )
    .unwrap();
    let out = duet(&["classify", "--dump-features", file.to_str().unwrap()]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["tier"], "SIMPLE");
    assert_eq!(lines[1]["tier"], Value::Null);
    assert_eq!(lines[0]["embedding"].as_array().unwrap().len(), 2 * 384); // two views
    let s = lines[1]["signals"].as_array().unwrap();
    assert_eq!(s.len(), 8);
    assert!((s[4].as_f64().unwrap() - 2f64.ln()).abs() < 1e-5, "{s:?}"); // two messages
    assert_eq!(s[5], 1.0); // a system prompt

    std::fs::write(&file, "{\"prompt\": \"x\", \"tier\": \"HARD\"}\n").unwrap();
    let (ok, _, err) = duet_status(&["classify", "--eval", file.to_str().unwrap()]);
    assert!(
        !ok && err.contains("in.jsonl:1") && err.contains("SIMPLE, MODERATE or COMPLEX"),
        "{err}"
    );
    std::fs::write(&file, "{\"prompt\": \"x\"}\n").unwrap();
    let (ok, _, err) = duet_status(&["classify", "--eval", file.to_str().unwrap()]);
    assert!(!ok && err.contains("no \"tier\""), "{err}");
}

fn post(
    s: &server::Server,
    body: Value,
    tier: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = client().post(format!("{}/api/chat", s.base)).json(&body);
    if let Some(t) = tier {
        r = r.header("X-Duet-Tier", t);
    }
    let r = r.send().unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.json().unwrap_or(Value::Null))
}

fn chat(prompt: &str, options: Value) -> Value {
    json!({"model": "auto", "stream": false, "options": options,
        "messages": [{"role": "user", "content": prompt}]})
}

#[test]
fn the_server_takes_corrections_logs_decisions_and_sizes_simple_answers() {
    let (dir, path) = config_with(|t| {
        let mut simple = toml::Table::new();
        simple.insert("num_predict".into(), 3.into());
        let mut tiers = toml::Table::new();
        tiers.insert("simple".into(), simple.into());
        routing(t).insert("tiers".into(), tiers.into());
        routing(t).remove("draft");
    });
    let log = dir.path().join("decisions.jsonl");
    let s = server::start_env(
        &["--config", &path, "--layout", "cpu"],
        &[],
        &[("DUET_ROUTING_LOG", log.to_str().unwrap())],
    );
    let simple = "Add a docstring to: def add(a, b): return a + b";
    let greedy = json!({"temperature": 0});
    // The SIMPLE tier's cap applies to a request that set no num_predict…
    let (status, h, v) = post(&s, chat(simple, greedy.clone()), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(h["x-duet-tier"], "SIMPLE");
    assert_eq!(v["model"], SMALL);
    assert_eq!(v["eval_count"], 3, "{v}");
    // …and not to one that did.
    let (_, _, v) = post(
        &s,
        chat(simple, json!({"temperature": 0, "num_predict": 5})),
        None,
    );
    assert_eq!(v["eval_count"], 5, "{v}");
    // The client corrects the decision: its tier wins and is logged as a label.
    let (status, h, v) = post(&s, chat(simple, json!({"num_predict": 1})), Some("complex"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(h["x-duet-tier"], "COMPLEX");
    assert_eq!(h["x-duet-model"], LARGE);
    assert_eq!(v["model"], LARGE);
    let (status, _, v) = post(&s, chat(simple, json!({"num_predict": 1})), Some("hard"));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("X-Duet-Tier"), "{v}");

    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| !l.to_string().contains("def add")));
    assert_eq!(lines[0]["by"], "learned");
    assert_eq!(lines[0]["model"], SMALL);
    assert_eq!(lines[0]["label"], Value::Null);
    assert_eq!(
        lines[0]["features"]["embedding"].as_array().unwrap().len(),
        2 * 384
    );
    assert_eq!(
        (lines[2]["label"].as_str(), lines[2]["by"].as_str()),
        (Some("COMPLEX"), Some("client"))
    );
    assert_eq!(lines[0]["prompt_hash"], lines[2]["prompt_hash"]);
}

/// A server whose draft policy keeps every draft (threshold far below any mean
/// log-probability) or none (above zero, which no mean log-probability exceeds).
fn draft_server(
    signal: &str,
    threshold: f64,
    log: &std::path::Path,
) -> (tempfile::TempDir, server::Server) {
    let (dir, path) = config_with(|t| {
        let draft: toml::Table = toml::from_str(&format!(
            "below = 1.0\nsignal = \"{signal}\"\nthreshold = {threshold:?}"
        ))
        .unwrap();
        routing(t).insert("draft".into(), draft.into());
    });
    let s = server::start_env(
        &["--config", &path, "--layout", "cpu"],
        &[],
        &[("DUET_ROUTING_LOG", log.to_str().unwrap())],
    );
    (dir, s)
}

#[test]
fn unsure_requests_are_drafted_by_the_fast_model_and_escalated_on_a_weak_signal() {
    let moderate = "Fix the bug in this function:\ndef last(xs):\n    return xs[len(xs)]";
    let opts = json!({"temperature": 0, "num_predict": 4});
    let logs = tempfile::tempdir().unwrap();
    for (threshold, answered_by, escalated) in [(-1000.0, SMALL, false), (0.5, LARGE, true)] {
        let log = logs.path().join(format!("{escalated}.jsonl"));
        let (_dir, s) = draft_server("mean_logprob", threshold, &log);
        let (status, h, v) = post(&s, chat(moderate, opts.clone()), None);
        assert_eq!(status, 200, "{v}");
        assert_eq!(h["x-duet-tier"], "MODERATE");
        assert_eq!(h["x-duet-draft"], SMALL);
        assert_eq!(v["model"], answered_by, "threshold {threshold}: {v}");
        assert_eq!(v["eval_count"], 4, "{v}");
        assert!(v.get("logprobs").is_none(), "not asked for: {v}");
        // Streamed the same way, with the log probabilities the client asked for.
        let mut body = chat(moderate, opts.clone());
        body["stream"] = true.into();
        body["logprobs"] = true.into();
        let lines = s.stream("/api/chat", body);
        assert_eq!(lines.last().unwrap()["model"], answered_by);
        let lp: usize = lines
            .iter()
            .filter_map(|l| l["logprobs"].as_array())
            .map(|a| a.len())
            .sum();
        assert_eq!(lp, 4, "{lines:?}");
        let text = std::fs::read_to_string(&log).unwrap();
        let drafts: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["event"] == "draft")
            .collect();
        assert_eq!(drafts.len(), 2, "{text}");
        assert!(
            drafts
                .iter()
                .all(|d| d["escalated"] == escalated && d["signal"].is_number()),
            "{text}"
        );
    }
}

#[test]
fn a_draft_audited_by_the_quality_model_is_kept_or_escalated_with_its_prompt_cached() {
    let moderate = "Fix the bug in this function:\ndef last(xs):\n    return xs[len(xs)]";
    let opts = json!({"temperature": 0, "num_predict": 6});
    let logs = tempfile::tempdir().unwrap();
    for (threshold, answered_by) in [(-1000.0, SMALL), (0.5, LARGE)] {
        let log = logs.path().join(format!("{threshold}.jsonl"));
        let (_dir, s) = draft_server("audit_min_logprob", threshold, &log);
        let (status, h, v) = post(&s, chat(moderate, opts.clone()), None);
        assert_eq!(status, 200, "{v}");
        assert_eq!(h["x-duet-draft"], SMALL);
        assert_eq!(v["model"], answered_by, "threshold {threshold}: {v}");
        let large = format!("model=\"{LARGE}\"");
        // The quality model read the prompt and the draft (the audit) but generated
        // nothing for a kept draft...
        // (A step's counts are recorded just after the step, which may be after the
        // answer reached the client: wait for them.)
        let ran = || s.metric("duet_scheduled_tokens_total", &[&large]);
        let prompt = v["prompt_eval_count"].as_f64().unwrap();
        wait_until("the audit's rows to be counted", 30, || {
            ran() >= prompt + 6.0
        });
        let generated = s.metric("duet_generated_tokens_total", &[&large]);
        let hits = || s.metric("duet_prefix_cache_hit_tokens_total", &[&large]);
        if answered_by == SMALL {
            assert_eq!(generated, 0.0);
        } else {
            // ...and an escalation starts from the prompt's blocks the audit left.
            assert_eq!(generated, 6.0);
            wait_until("32 prompt positions from the prefix cache", 30, || {
                hits() >= 32.0
            });
        }
        let text = std::fs::read_to_string(&log).unwrap();
        let draft: Value = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|l| l["event"] == "draft")
            .unwrap();
        let signal = draft["signal"].as_f64().unwrap();
        assert!(signal <= 0.0, "a log probability: {text}");
        assert_eq!(draft["escalated"], answered_by == LARGE, "{text}");
        if answered_by == SMALL {
            audit_scores_the_drafts_own_tokens(&s, &log, moderate);
        }
    }
}

/// The audit's signal is the quality model's lowest log-probability over exactly the
/// draft's tokens: a raw prompt drafted and kept, then the same prompt and draft scored
/// through `/v1/completions` echo on the quality model.
fn audit_scores_the_drafts_own_tokens(s: &server::Server, log: &std::path::Path, ask: &str) {
    let raw = format!("<|im_start|>user\n{ask}<|im_end|>\n<|im_start|>assistant\n");
    let r = client()
        .post(format!("{}/api/generate", s.base))
        .json(
            &json!({"model": "auto", "prompt": raw, "raw": true, "stream": false,
                      "options": {"temperature": 0, "num_predict": 6}}),
        )
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-duet-draft"], SMALL);
    let v: Value = r.json().unwrap();
    assert_eq!(v["model"], SMALL, "{v}");
    let draft = v["response"].as_str().unwrap();
    let text = std::fs::read_to_string(log).unwrap();
    let signal = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .rfind(|l| l["event"] == "draft")
        .unwrap()["signal"]
        .as_f64()
        .unwrap();
    let (status, e) = s.post(
        "/v1/completions",
        json!({"model": LARGE, "prompt": format!("{raw}{draft}"), "echo": true, "max_tokens": 0}),
    );
    assert_eq!(status, 200, "{e}");
    let l = &e["choices"][0]["logprobs"];
    let tokens = strs(&l["tokens"]);
    let n = tokens.len();
    // The draft's 6 tokens are the text's last 6 (no token spans the boundary here).
    assert_eq!(tokens[n - 6..].concat(), draft, "{e}");
    let min = l["token_logprobs"].as_array().unwrap()[n - 6..]
        .iter()
        .map(|x| x.as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert!((min - signal).abs() < 1e-3, "audit {signal} vs echo {min}");
}

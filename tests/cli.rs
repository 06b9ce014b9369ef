//! The `duet` binary end to end on the real models: run, list, show.

mod common;
use common::*;
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

fn duet(args: &[&str]) -> (String, String) {
    let (ok, stdout, stderr) = duet_status(args);
    assert!(ok, "duet {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn run_writes_a_docstring_and_verbose_stats() {
    let (out, err) = duet(&[
        "run",
        SMALL,
        "Write a docstring for: def add(a, b): return a + b",
        "--temperature",
        "0",
        "--num-predict",
        "48",
        "--verbose",
    ]);
    assert!(out.contains("\"\"\""), "no docstring in {out:?}");
    assert!(out.to_lowercase().contains("add"), "{out:?}");
    for line in [
        "prompt eval rate:",
        "eval rate:",
        "eval count:           48 token(s)",
        "load duration:",
    ] {
        assert!(err.contains(line), "missing {line:?} in {err}");
    }
}

#[test]
fn run_raw_and_system_flags() {
    // --raw: the text goes to the model as is (no template), here a code prefix to continue.
    let (out, _) = duet(&[
        "run",
        SMALL,
        "--raw",
        "def fibonacci(n):",
        "--temperature",
        "0",
        "--num-predict",
        "16",
    ]);
    assert!(!out.trim().is_empty());
    let (out, _) = duet(&[
        "run",
        SMALL,
        "What is 2+2?",
        "--system",
        "Answer with a single number and nothing else.",
        "--temperature",
        "0",
        "--num-predict",
        "8",
    ]);
    assert!(out.contains('4'), "{out:?}");
}

#[test]
fn list_shows_both_cpu_models_on_their_own_devices() {
    let (out, _) = duet(&["list"]);
    assert!(out.contains("layout: cpu"), "{out}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .to_string()
    };
    assert!(
        line(SMALL).contains("cpu:0") && line(SMALL).contains("SIMPLE"),
        "{out}"
    );
    assert!(
        line(LARGE).contains("cpu:1") && line(LARGE).contains("COMPLEX"),
        "{out}"
    );
    assert!(
        line("qwen2.5-coder:7b-instruct-q8_0").contains("missing"),
        "{out}"
    );
}

#[test]
fn show_describes_the_model() {
    let (out, _) = duet(&["show", LARGE]);
    for want in [
        "architecture        qwen2",
        "parameters          1.78B (1.5B)",
        "quantization        Q4_K_M",
        "context length      32768",
        "device              cpu:1",
        "tiers               MODERATE,COMPLEX",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

fn eval_accuracy(file: &str) -> f64 {
    let (out, _) = duet(&["classify", "--rules", "--json", "--eval", file]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let m = &v["confusion"]["matrix"];
    assert_eq!(v["confusion"]["order"][0], "SIMPLE");
    assert_eq!(m.as_array().unwrap().len(), 3);
    v["accuracy"].as_f64().unwrap()
}

#[test]
fn classify_scores_the_dev_set_and_a_held_out_set() {
    // The keyword rules (the learned classifier's fallback; tests/router.rs scores the
    // learned one). tests/routing/dev.jsonl is the shared labelled development set;
    // heldout.jsonl was written separately, to catch rules fitted to the dev set's exact
    // wording.
    assert!(eval_accuracy("tests/routing/dev.jsonl") >= 0.95);
    assert!(eval_accuracy("tests/routing/heldout.jsonl") >= 0.90);
    let (out, _) = duet(&["classify", "--rules", "--eval", "tests/routing/dev.jsonl"]);
    assert!(out.starts_with("accuracy: "), "{out}");
    assert!(out.contains("expected \\ predicted"), "{out}");
}

#[test]
fn classify_prints_the_decision_with_reasons() {
    let (out, _) = duet(&[
        "classify",
        "--rules",
        "--json",
        "Write a tool that generates docstrings for a whole package",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tier"], "COMPLEX");
    assert_eq!(v["model"], LARGE);
    let c = v["confidence"].as_f64().unwrap();
    assert!(c > 0.0 && c <= 1.0);
    let reasons = strs(&v["reasons"]);
    assert!(
        reasons.iter().any(|r| r.contains("whole package")),
        "{reasons:?}"
    );
    let (out, _) = duet(&["classify", "--rules", "Add type hints: def f(x): return x"]);
    assert!(
        out.contains("tier:       SIMPLE") && out.contains(SMALL),
        "{out}"
    );
    assert!(out.contains("rule mechanical-edit"), "{out}");
}

#[test]
fn bench_quick_emits_json_with_alone_and_concurrent_rates() {
    let (out, _) = duet(&["bench", "--quick", "--json", "--model", SMALL]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["layout"], "cpu");
    let r = &v["results"].as_array().unwrap()[0];
    assert_eq!(r["model"], SMALL);
    assert_eq!(r["device"], "cpu:0");
    assert_eq!(r["prompt"][0]["tokens"], 32);
    assert!(
        r["prompt"][0]["tokens_per_second"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        r["generation_tokens_per_second"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(r["time_to_first_token_ms"]["median"].as_f64().unwrap() > 0.0);
    assert!(
        r["concurrent_tokens_per_second"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // The Markdown report has the per-device and the concurrent tables.
    let (md, _) = duet(&["bench", "--quick", "--model", SMALL]);
    assert!(
        md.contains("| model | device | load s |")
            && md.contains("All devices generating at the same moment"),
        "{md}"
    );
}

#[test]
fn bench_runs_generated_weights_of_the_real_1_5b_shape() {
    let (out, _) = duet(&[
        "bench",
        "--quick",
        "--json",
        "--dummy-weights",
        "1.5b-q4_k_m",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let r = &v["results"].as_array().unwrap()[0];
    assert_eq!(r["model"], "dummy:1.5b-q4_k_m");
    assert_eq!(r["generated_weights"], true);
    // Every token reads the 28 layers' matrices and the Q6_K output projection: 0.98 GB.
    let bytes = r["weight_bytes_per_token"].as_u64().unwrap();
    assert!((975_000_000..990_000_000).contains(&bytes), "{bytes}");
    // bench fails unless all 8 tokens were generated (no stop on random weights).
    assert_eq!(r["generation_tokens"], 8);
    assert!(
        r["generation_tokens_per_second"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn bench_refuses_an_unknown_weight_shape() {
    let (ok, _, err) = duet_status(&["bench", "--dummy-weights", "13b-q2"]);
    assert!(!ok);
    assert!(
        err.contains("unknown weight shape '13b-q2' (known: 1.5b-q4_k_m, 7b-q8_0)"),
        "{err}"
    );
}

#[test]
fn device_check_compares_the_cpu_paths_and_refuses_cuda_without_it() {
    // On the CPU the Q5_0 matmuls go through the Q8_0 rewrite and are compared with
    // candle's own Q5_0 kernel.
    let (out, _) = duet(&["device-check", "--device", "cpu:0"]);
    assert!(out.contains("| qmatmul Q5_0 128x896 · 896x896 |"), "{out}");
    assert!(out.contains("0 failed"), "{out}");
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = duet_status(&["device-check", "--device", "cuda:0"]);
        assert!(!ok);
        assert!(err.contains("built without CUDA"), "{err}");
    }
}

//! The request classifier: SIMPLE / MODERATE / COMPLEX from what is asked.
//!
//! Signals, each documented where it is scored:
//! - **rules** (the main signal): phrases with a weight for one tier, matched on whole
//!   words in the *instruction* only. The instruction is the prose of the request; code
//!   attached to it (fenced blocks, indented or code-looking lines, the code after "...:",
//!   `backtick spans`) is set apart first, so a docstring request about a function named
//!   `implement_parser` is not mistaken for an implementation request. Each rule counts
//!   once per request, however many of its phrases appear.
//! - **attached code size**: long code adds a little to MODERATE, very long code to
//!   COMPLEX. Small weights: the size of the code matters less than what is asked.
//! - **chat turns**: a long conversation adds a little to MODERATE (follow-ups depend on
//!   everything said before).
//! - **system prompt**: matched against the same rules, with weights scaled down.
//! - **requested num_predict**: a short answer cap leans SIMPLE, a very long one COMPLEX.
//!
//! The tier with the highest score wins; with no signal at all, the default tier does.
//! Confidence is the winner's share of the softmax over the three scores. A SIMPLE
//! decision below `escalate_below` confidence moves up to MODERATE: quality wins ties.
//!
//! These rules are the fallback and the override layer of the learned classifier
//! (learned.rs, the default): it decides unless a rule marked `override = true` fires
//! (the operator's word wins), and the rules decide alone while the embedding model it
//! needs is loading or unavailable, which each decision's reasons say.

use super::learned::{self, Features, Head};
use crate::config::{ClassifierKind, RoutingRules, Tier};
use crate::model::embed::Embedder;
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What the classifier looks at.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// The request to classify: the prompt, or the last user message of a chat.
    pub prompt: &'a str,
    pub system: Option<&'a str>,
    /// Messages in the conversation so far (1 for a single prompt).
    pub turns: usize,
    /// The client's num_predict / max_tokens, when it set one.
    pub num_predict: Option<i32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    pub tier: Tier,
    pub confidence: f32,
    /// Which rules and signals fired, with their weights (learned: the signals that
    /// moved the decision most).
    pub reasons: Vec<String>,
    /// Scores of SIMPLE, MODERATE, COMPLEX (learned: the head's logits).
    pub scores: [f32; 3],
    /// What decided: the learned head, the rules, an override rule, or the client.
    pub by: DecidedBy,
    /// The learned head's probabilities of SIMPLE, MODERATE, COMPLEX, when it ran.
    pub probabilities: Option<[f32; 3]>,
    /// What the learned head read (for the decision log).
    #[serde(skip)]
    pub features: Option<Features>,
    /// Time spent classifying, microseconds.
    pub micros: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DecidedBy {
    Learned,
    Rules,
    Override,
    /// The client's X-Duet-Tier.
    Client,
}

impl Decision {
    /// The client's correction (X-Duet-Tier): its tier wins, the rest is kept for the log.
    pub fn force(&mut self, tier: Tier) {
        self.reasons.push(format!(
            "X-Duet-Tier: {tier} (the classifier said {} at {:.2})",
            self.tier, self.confidence
        ));
        self.tier = tier;
        self.confidence = 1.0;
        self.by = DecidedBy::Client;
    }
}

/// Where the learned classifier gets its embedding model: the loaded model, or why
/// there is none (still loading, failed, not configured).
pub type EmbedderSource = Arc<dyn Fn() -> Result<Arc<Embedder>, String> + Send + Sync>;

struct Learned {
    head: Head,
    embedder: EmbedderSource,
    /// A fallback to the rules has been logged as a warning.
    warned: AtomicBool,
}

fn idx(t: Tier) -> usize {
    match t {
        Tier::Simple => 0,
        Tier::Moderate => 1,
        Tier::Complex => 2,
    }
}

const TIERS: [Tier; 3] = [Tier::Simple, Tier::Moderate, Tier::Complex];

pub struct Classifier {
    rules: RoutingRules,
    matcher: AhoCorasick,
    /// Pattern index → rule index.
    pattern_rule: Vec<usize>,
    learned: Option<Learned>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the routing rules: {0}")]
pub struct RulesError(String);

impl Classifier {
    pub fn new(rules: RoutingRules) -> Result<Self, RulesError> {
        let mut patterns = Vec::new();
        let mut pattern_rule = Vec::new();
        for (i, rule) in rules.rules.iter().enumerate() {
            for p in &rule.phrases {
                patterns.push(p.to_lowercase());
                pattern_rule.push(i);
            }
        }
        let matcher = AhoCorasickBuilder::new()
            .match_kind(MatchKind::Standard)
            .build(&patterns)
            .map_err(|e| RulesError(e.to_string()))?;
        Ok(Self {
            rules,
            matcher,
            pattern_rule,
            learned: None,
        })
    }

    /// The learned classifier over these rules: `head` over the embeddings of
    /// `embedder` (unless models.toml says `classifier = "rules"`).
    pub fn with_learned(mut self, head: Head, embedder: EmbedderSource) -> Self {
        if self.rules.classifier == ClassifierKind::Learned {
            self.learned = Some(Learned {
                head,
                embedder,
                warned: AtomicBool::new(false),
            });
        }
        self
    }

    /// The learned head, when this classifier uses one.
    pub fn head(&self) -> Option<&Head> {
        self.learned.as_ref().map(|l| &l.head)
    }

    /// Adds the weight of every rule whose phrases occur as whole words in `text`.
    fn score_rules(
        &self,
        text: &str,
        factor: f32,
        scores: &mut [f32; 3],
        reasons: &mut Vec<String>,
        label: &str,
        forced: &mut Option<(Tier, f32, String)>,
    ) {
        let bytes = text.as_bytes();
        let mut fired = vec![false; self.rules.rules.len()];
        for m in self.matcher.find_overlapping_iter(text) {
            let before_ok = m.start() == 0 || !is_word(bytes[m.start() - 1]);
            let after_ok = m.end() == bytes.len() || !is_word(bytes[m.end()]);
            if !(before_ok && after_ok) {
                continue;
            }
            let r = self.pattern_rule[m.pattern().as_usize()];
            if fired[r] {
                continue;
            }
            fired[r] = true;
            let rule = &self.rules.rules[r];
            let w = rule.weight * factor;
            scores[idx(rule.tier)] += w;
            if rule.force && factor >= 1.0 {
                let stronger = forced
                    .as_ref()
                    .is_none_or(|(t, fw, _)| w > *fw || (w == *fw && rule.tier > *t));
                if stronger {
                    *forced = Some((rule.tier, w, rule.name.clone()));
                }
            }
            reasons.push(format!(
                "{label}rule {} +{w:.2} {}: \"{}\"",
                rule.name,
                rule.tier,
                &text[m.start()..m.end()]
            ));
        }
    }

    /// The tier of a request: the learned head's (or an override rule's) when it has
    /// one, else the rules'.
    pub fn classify(&self, req: &Request) -> Decision {
        let start = Instant::now();
        let parts = split_instruction(req.prompt);
        let (mut d, forced) = self.by_rules(&parts, req);
        if let Some((tier, w, name)) = forced {
            d.reasons.insert(
                0,
                format!("override rule {name} (+{w:.2} {tier}) decides: {tier}"),
            );
            d.tier = tier;
            d.confidence = 1.0;
            d.by = DecidedBy::Override;
        } else if let Some(l) = &self.learned {
            match (l.embedder)().and_then(|e| {
                learned::features_of(&e, &parts, req, l.head.max_tokens).map_err(|e| e.to_string())
            }) {
                Ok(f) => d = self.by_head(&l.head, f),
                Err(why) => {
                    if !l.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "learned router unavailable, routing by the keyword rules: {why}"
                        );
                    }
                    d.reasons.insert(
                        0,
                        format!("learned classifier unavailable ({why}): keyword rules"),
                    );
                }
            }
        }
        if d.tier == Tier::Simple
            && d.confidence < self.rules.escalate_below
            && d.by != DecidedBy::Override
        {
            d.reasons.push(format!(
                "confidence {:.2} < {:.2}: SIMPLE escalated to MODERATE",
                d.confidence, self.rules.escalate_below
            ));
            d.tier = Tier::Moderate;
        }
        d.micros = start.elapsed().as_micros() as u64;
        d
    }

    fn by_head(&self, head: &Head, f: Features) -> Decision {
        let (p, logits) = head.predict(&f);
        let mut best = 0;
        for i in 1..3 {
            if p[i] >= p[best] {
                best = i;
            }
        }
        let tier = TIERS[best];
        let reasons = head
            .contributions(&f, tier)
            .into_iter()
            .take(3)
            .map(|(name, v)| format!("{name}: {v:+.2} toward {tier}"))
            .collect();
        Decision {
            tier,
            confidence: p[best],
            reasons,
            scores: logits,
            by: DecidedBy::Learned,
            probabilities: Some(p),
            features: Some(f),
            micros: 0,
        }
    }

    /// The rules' decision (before escalation), and the override rule that fired.
    fn by_rules(&self, parts: &Parts, req: &Request) -> (Decision, Option<(Tier, f32, String)>) {
        let s = &self.rules.signals;
        let mut scores = [0f32; 3];
        let mut reasons = Vec::new();
        let mut forced = None;
        self.score_rules(
            &parts.instruction,
            1.0,
            &mut scores,
            &mut reasons,
            "",
            &mut forced,
        );
        if let Some(system) = req.system.filter(|s| !s.is_empty()) {
            let sys = split_instruction(system);
            self.score_rules(
                &sys.instruction,
                s.system_factor,
                &mut scores,
                &mut reasons,
                "system ",
                &mut forced,
            );
        }
        if parts.code_lines >= s.huge_code_lines {
            scores[idx(Tier::Complex)] += s.code_weight;
            reasons.push(format!(
                "attached code: {} lines (>= {}) +{:.2} COMPLEX",
                parts.code_lines, s.huge_code_lines, s.code_weight
            ));
        } else if parts.code_lines >= s.long_code_lines {
            scores[idx(Tier::Moderate)] += s.code_weight;
            reasons.push(format!(
                "attached code: {} lines (>= {}) +{:.2} MODERATE",
                parts.code_lines, s.long_code_lines, s.code_weight
            ));
        }
        if req.turns >= s.many_turns {
            scores[idx(Tier::Moderate)] += s.turns_weight;
            reasons.push(format!(
                "conversation: {} turns (>= {}) +{:.2} MODERATE",
                req.turns, s.many_turns, s.turns_weight
            ));
        }
        match req.num_predict {
            Some(n) if n > 0 && n <= s.short_answer_tokens => {
                scores[idx(Tier::Simple)] += s.answer_weight;
                reasons.push(format!(
                    "num_predict {n} (<= {}) +{:.2} SIMPLE",
                    s.short_answer_tokens, s.answer_weight
                ));
            }
            Some(n) if n >= s.long_answer_tokens => {
                scores[idx(Tier::Complex)] += s.answer_weight;
                reasons.push(format!(
                    "num_predict {n} (>= {}) +{:.2} COMPLEX",
                    s.long_answer_tokens, s.answer_weight
                ));
            }
            _ => {}
        }

        let fired = scores.iter().any(|&x| x > 0.0);
        let tier = if fired {
            // Ties go to the larger model: quality first.
            let mut best = 0;
            for i in 1..3 {
                if scores[i] >= scores[best] {
                    best = i;
                }
            }
            TIERS[best]
        } else {
            reasons.push(format!(
                "no signal: default tier {}",
                self.rules.default_tier
            ));
            self.rules.default_tier
        };
        let confidence = if fired {
            softmax_share(&scores, idx(tier))
        } else {
            1.0 / 3.0
        };
        let d = Decision {
            tier,
            confidence,
            reasons,
            scores,
            by: DecidedBy::Rules,
            probabilities: None,
            features: None,
            micros: 0,
        };
        (d, forced)
    }
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn softmax_share(scores: &[f32; 3], i: usize) -> f32 {
    let max = scores.iter().copied().fold(f32::MIN, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    exps[i] / exps.iter().sum::<f32>()
}

/// The prose of a request (lowercased) and how many lines of code came with it.
#[derive(Debug, PartialEq)]
pub struct Parts {
    pub instruction: String,
    pub code_lines: usize,
    /// `inline code` spans cut out of the instruction.
    pub inline_code: usize,
}

const CODE_STARTS: &[&str] = &[
    "def ",
    "fn ",
    "pub ",
    "class ",
    "function ",
    "return ",
    "import ",
    "from ",
    "let ",
    "const ",
    "var ",
    "if ",
    "for ",
    "while ",
    "select ",
    "#include",
    "package ",
    "func ",
    "struct ",
    "impl ",
    "async ",
    "await ",
    "} ",
    "}",
    "{",
    "@",
    "//",
    "/*",
    "<",
    "$ ",
];

fn looks_like_code(line: &str) -> bool {
    let t = line.trim_end();
    if t.is_empty() {
        return false;
    }
    if line.starts_with("    ") || line.starts_with('\t') {
        return true;
    }
    let lower = t.to_ascii_lowercase();
    if CODE_STARTS.iter().any(|p| lower.starts_with(p)) {
        return true;
    }
    let last = t.as_bytes()[t.len() - 1];
    // Statements and blocks end in these; prose ends in . ? ! or a word.
    matches!(last, b';' | b'{' | b'}' | b')' | b']') && t.contains(['(', '=', '{', '['])
        || (t.contains(" = ") && !t.contains(". "))
}

/// Cuts inline code off a prose line: after "...: " when what follows looks like code.
fn prose_of_line(line: &str) -> (&str, bool) {
    if let Some(at) = line.find(": ") {
        let rest = &line[at + 2..];
        if looks_like_code(rest)
            || rest.contains(['(', '{', '=', '[', '"', '\'']) && !rest.contains(". ")
        {
            return (&line[..at], true);
        }
    }
    (line, false)
}

pub fn split_instruction(prompt: &str) -> Parts {
    let mut instruction = String::with_capacity(prompt.len().min(512));
    let mut code_lines = 0;
    let mut inline_code = 0;
    let mut in_fence = false;
    for (n, line) in prompt.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || (n > 0 && looks_like_code(line)) {
            code_lines += usize::from(!line.trim().is_empty());
            continue;
        }
        let (prose, had_code) = prose_of_line(line);
        code_lines += usize::from(had_code);
        // Drop `inline code` spans.
        let mut inside = false;
        for part in prose.split('`') {
            if !inside {
                instruction.push_str(&part.to_lowercase());
            } else {
                inline_code += 1;
            }
            inside = !inside;
        }
        instruction.push('\n');
    }
    Parts {
        instruction,
        code_lines,
        inline_code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, BUILTIN_MODELS_TOML};

    fn classifier() -> Classifier {
        let cfg = Config::parse(BUILTIN_MODELS_TOML, "built-in", ".".into()).unwrap();
        Classifier::new(cfg.routing.clone()).unwrap()
    }

    fn tier(prompt: &str) -> Tier {
        classifier()
            .classify(&Request {
                prompt,
                turns: 1,
                ..Default::default()
            })
            .tier
    }

    #[test]
    fn code_is_set_apart_from_the_instruction() {
        let p = split_instruction(
            "Write a docstring for this function:\ndef implement_parser(x):\n    return x",
        );
        assert_eq!(p.instruction, "write a docstring for this function:\n");
        assert_eq!(p.code_lines, 2);
        let p =
            split_instruction("Add type hints to: def join(parts, sep): return sep.join(parts)");
        assert_eq!(p.instruction, "add type hints to\n");
        assert_eq!(p.code_lines, 1);
        let p = split_instruction(
            "What does the `Arc::new` call do?\n```rust\nlet a = Arc::new(1);\n```",
        );
        assert_eq!(p.instruction, "what does the  call do?\n");
        assert_eq!(p.code_lines, 1);
    }

    #[test]
    fn documentation_and_mechanical_edits_are_simple() {
        for p in [
            "Write a docstring for: def implement_raft(node): ...",
            "Add a doc comment to this Rust function: fn area(r: f64) -> f64 { 3.14 * r * r }",
            "Rename the variable `x` to `count`.",
            "Give me the shell command to list open ports.",
            "Explain what a mutex is in two sentences.",
        ] {
            assert_eq!(tier(p), Tier::Simple, "{p}");
        }
    }

    #[test]
    fn bounded_changes_are_moderate() {
        for p in [
            "Refactor this function to use early returns:\ndef f(x):\n    if x:\n        return 1\n    else:\n        return 2",
            "Fix the bug in this loop: for i in range(len(xs)+1): print(xs[i])",
            "Write unit tests for this function: def add(a, b): return a + b",
            "Port this function from JavaScript to Python.",
        ] {
            assert_eq!(tier(p), Tier::Moderate, "{p}");
        }
    }

    #[test]
    fn open_ended_work_is_complex_even_with_simple_keywords() {
        for p in [
            "Write a tool that generates docstrings for a whole package.",
            "Design a plugin architecture for our editor.",
            "Implement a B-tree with insertion and deletion in C++.",
            "Our API times out intermittently across services; help me find the root cause.",
        ] {
            assert_eq!(tier(p), Tier::Complex, "{p}");
        }
    }

    #[test]
    fn signals_add_their_weight() {
        let c = classifier();
        let base = Request {
            prompt: "Hello there",
            turns: 1,
            ..Default::default()
        };
        let d = c.classify(&base);
        assert_eq!(d.scores, [0.0, 0.0, 0.0]);
        assert!(d.reasons[0].contains("no signal"));

        let long_code = format!("Look at this:\n{}", "    x = x + 1\n".repeat(60));
        let d = c.classify(&Request {
            prompt: &long_code,
            ..base.clone()
        });
        assert!(d.scores[1] > 0.0, "{d:?}");
        assert!(d.reasons.iter().any(|r| r.contains("attached code")));

        let d = c.classify(&Request {
            turns: 12,
            ..base.clone()
        });
        assert!(
            d.scores[1] > 0.0 && d.reasons.iter().any(|r| r.contains("turns")),
            "{d:?}"
        );

        let d = c.classify(&Request {
            num_predict: Some(16),
            ..base.clone()
        });
        assert!(d.scores[0] > 0.0, "{d:?}");
        let d = c.classify(&Request {
            num_predict: Some(4096),
            ..base.clone()
        });
        assert!(d.scores[2] > 0.0, "{d:?}");

        let d = c.classify(&Request {
            system: Some("You are a software architect. Design systems."),
            ..base.clone()
        });
        assert!(
            d.scores[2] > 0.0 && d.reasons.iter().any(|r| r.starts_with("system ")),
            "{d:?}"
        );
    }

    #[test]
    fn rules_match_whole_words_only() {
        // "parses" must not fire a rule on "parser"; "renamed" not on "rename".
        let c = classifier();
        let d = c.classify(&Request {
            prompt: "it parses and renamed things",
            turns: 1,
            ..Default::default()
        });
        assert!(
            d.reasons
                .iter()
                .all(|r| !r.contains("\"parser\"") && !r.contains("\"rename\"")),
            "{d:?}"
        );
    }

    #[test]
    fn confidence_is_a_probability_and_low_confidence_simple_escalates() {
        let c = classifier();
        let d = c.classify(&Request {
            prompt: "Write a docstring for: def f(): pass",
            turns: 1,
            ..Default::default()
        });
        assert!(d.confidence > 0.5 && d.confidence <= 1.0, "{d:?}");
        assert_eq!(d.tier, Tier::Simple);
        // The same decision under a stricter threshold is sent up a tier, and says so.
        let cfg = Config::parse(BUILTIN_MODELS_TOML, "built-in", ".".into()).unwrap();
        let strict = Classifier::new(crate::config::Routing {
            escalate_below: d.confidence + 0.01,
            ..cfg.routing
        })
        .unwrap();
        let d = strict.classify(&Request {
            prompt: "Write a docstring for: def f(): pass",
            turns: 1,
            ..Default::default()
        });
        assert!(d.reasons.last().unwrap().contains("escalated"), "{d:?}");
        assert_eq!(d.tier, Tier::Moderate, "{d:?}");
    }
}

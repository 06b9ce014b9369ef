//! Confidence-driven escalation: the signal computed over the fast model's draft that
//! decides whether the draft is returned or the request re-runs on its tier's model
//! (`[routing.draft]` in models.toml; measured on HumanEval in BENCHMARKS.md).

use crate::config::{DraftPolicy, DraftSignal};
use crate::serving::Logprob;

/// The alternatives per token the signal needs.
pub fn top_logprobs(signal: DraftSignal) -> usize {
    match signal {
        DraftSignal::MeanEntropy => crate::serving::MAX_TOP_LOGPROBS,
        _ => 0,
    }
}

/// Entropy (nats) of one token's top alternatives, the remaining probability mass
/// counted as one more outcome (a lower bound of the full distribution's).
pub fn entropy(l: &Logprob) -> f32 {
    let ps: Vec<f32> = l.top_logprobs.iter().map(|t| t.logprob.exp()).collect();
    let rest = (1.0 - ps.iter().sum::<f32>()).max(0.0);
    let mut h: f32 = -ps
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f32>();
    if rest > 1e-9 {
        h -= rest * rest.ln();
    }
    h
}

/// The value of `signal` over a draft's tokens (None for an empty draft).
pub fn value(signal: DraftSignal, tokens: &[Logprob]) -> Option<f32> {
    if tokens.is_empty() {
        return None;
    }
    let n = tokens.len() as f32;
    // An audit's tokens are the draft's as the quality model scored them.
    Some(match signal {
        DraftSignal::MeanLogprob | DraftSignal::AuditMeanLogprob => {
            tokens.iter().map(|t| t.token.logprob).sum::<f32>() / n
        }
        DraftSignal::MinLogprob | DraftSignal::AuditMinLogprob => tokens
            .iter()
            .map(|t| t.token.logprob)
            .fold(f32::INFINITY, f32::min),
        DraftSignal::MeanEntropy => tokens.iter().map(entropy).sum::<f32>() / n,
    })
}

/// Whether the draft is good enough to return: log-probabilities at or above the
/// threshold, entropy at or below it. An empty draft is not.
pub fn keep(policy: &DraftPolicy, v: Option<f32>) -> bool {
    match (policy.signal, v) {
        (_, None) => false,
        (DraftSignal::MeanEntropy, Some(v)) => v <= policy.threshold,
        (_, Some(v)) => v >= policy.threshold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::TokenLogprob;

    fn lp(logprob: f32, top: &[f32]) -> Logprob {
        let t = |l: f32| TokenLogprob {
            token: "x".into(),
            logprob: l,
            bytes: vec![],
        };
        Logprob {
            token: t(logprob),
            top_logprobs: top.iter().map(|&l| t(l)).collect(),
        }
    }

    #[test]
    fn signals_over_a_draft() {
        let d = [lp(-0.1, &[-0.1, -2.4]), lp(-1.5, &[-0.5, -1.5])];
        let mean = value(DraftSignal::MeanLogprob, &d).unwrap();
        assert!((mean + 0.8).abs() < 1e-6);
        assert_eq!(value(DraftSignal::MinLogprob, &d), Some(-1.5));
        // A certain token has no entropy; two equal halves have ln 2.
        assert!(entropy(&lp(0.0, &[0.0])).abs() < 1e-6);
        let half = 0.5f32.ln();
        assert!((entropy(&lp(half, &[half, half])) - 2f32.ln()).abs() < 1e-5);
        assert_eq!(value(DraftSignal::MeanEntropy, &[]), None);
    }

    #[test]
    fn the_threshold_keeps_or_escalates() {
        let p = |signal, threshold| DraftPolicy {
            below: 0.8,
            signal,
            threshold,
        };
        assert!(keep(&p(DraftSignal::MeanLogprob, -0.3), Some(-0.2)));
        assert!(!keep(&p(DraftSignal::MeanLogprob, -0.3), Some(-0.4)));
        assert!(keep(&p(DraftSignal::MeanEntropy, 0.5), Some(0.4)));
        assert!(!keep(&p(DraftSignal::MeanEntropy, 0.5), Some(0.6)));
        assert!(!keep(&p(DraftSignal::MinLogprob, -9.0), None));
    }
}

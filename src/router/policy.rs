//! Tier → model: walk the tier's ordered model list and take the first model that is
//! not loading, not failed and not at its queue limit. When none is free, the first model that
//! still exists takes the request (and may answer 503 for a full queue); with a single
//! model, everything goes there.

use crate::serving::worker::ModelSlot;
use std::sync::Arc;

/// Whether a model can take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Ready,
    Loading,
    QueueFull,
    Failed,
}

impl Availability {
    pub fn of(slot: &ModelSlot) -> Self {
        // A model out of memory (keep-alive ran out, or not preloaded) takes its
        // requests and loads; one loading now is skipped for a ready fallback.
        if slot.failure().is_some() || slot.is_absent() {
            Availability::Failed
        } else if slot.is_loading() {
            Availability::Loading
        } else if slot.is_full() {
            Availability::QueueFull
        } else {
            Availability::Ready
        }
    }

    fn why(self) -> &'static str {
        match self {
            Availability::Ready => "ready",
            Availability::Loading => "still loading",
            Availability::QueueFull => "queue full",
            Availability::Failed => "failed to load",
        }
    }
}

/// The outcome over names: index into `models`, whether it is a fallback, what was skipped.
#[derive(Debug, PartialEq)]
pub struct Choice {
    pub index: usize,
    pub fallback: bool,
    pub skipped: Vec<String>,
}

/// Picks among `models` (name, availability) for a tier's `chain` of names.
pub fn choose(chain: &[String], models: &[(&str, Availability)]) -> Option<Choice> {
    let find = |name: &str| models.iter().position(|(n, _)| *n == name);
    let mut skipped = Vec::new();
    for (i, name) in chain.iter().enumerate() {
        match find(name) {
            Some(at) if models[at].1 == Availability::Ready => {
                return Some(Choice {
                    index: at,
                    fallback: i > 0,
                    skipped,
                })
            }
            Some(at) => skipped.push(format!("{name}: {}", models[at].1.why())),
            None => skipped.push(format!("{name}: not loaded in this layout")),
        }
    }
    // Nothing free: the first listed model that has not failed (it queues or answers
    // 503), else any model of the server that has not failed (single-model mode).
    let usable = |at: &usize| models[*at].1 != Availability::Failed;
    let at = chain
        .iter()
        .filter_map(|n| find(n))
        .find(usable)
        .or_else(|| (0..models.len()).find(usable))?;
    Some(Choice {
        fallback: chain.first().map(String::as_str) != Some(models[at].0),
        index: at,
        skipped,
    })
}

pub struct Pick {
    pub slot: Arc<ModelSlot>,
    pub fallback: bool,
    pub skipped: Vec<String>,
}

/// Picks the model for a tier's `chain` among the server's `slots`.
pub fn pick(chain: &[String], slots: &[Arc<ModelSlot>]) -> Option<Pick> {
    let models: Vec<(&str, Availability)> = slots
        .iter()
        .map(|s| (s.name.as_str(), Availability::of(s)))
        .collect();
    let c = choose(chain, &models)?;
    Some(Pick {
        slot: slots[c.index].clone(),
        fallback: c.fallback,
        skipped: c.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::Availability::*;
    use super::*;

    fn chain(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn first_ready_model_of_the_chain_wins() {
        let c = choose(
            &chain(&["big", "small"]),
            &[("small", Ready), ("big", Ready)],
        )
        .unwrap();
        assert_eq!((c.index, c.fallback), (1, false));
        assert!(c.skipped.is_empty());
    }

    #[test]
    fn failed_missing_loading_and_full_models_fall_through() {
        for state in [Failed, Loading, QueueFull] {
            let c = choose(
                &chain(&["big", "small"]),
                &[("small", Ready), ("big", state)],
            )
            .unwrap();
            assert_eq!((c.index, c.fallback), (0, true), "{state:?}");
            assert_eq!(c.skipped.len(), 1);
        }
        let c = choose(&chain(&["big", "small"]), &[("small", Ready)]).unwrap();
        assert_eq!((c.index, c.fallback), (0, true));
        assert!(c.skipped[0].contains("not loaded"));
    }

    #[test]
    fn when_nothing_is_free_the_first_usable_takes_it() {
        let c = choose(
            &chain(&["big", "small"]),
            &[("small", QueueFull), ("big", QueueFull)],
        )
        .unwrap();
        assert_eq!((c.index, c.fallback), (1, false));
        let c = choose(&chain(&["big"]), &[("only", Loading)]).unwrap();
        assert_eq!((c.index, c.fallback), (0, true));
        assert!(choose(&chain(&["big"]), &[("big", Failed)]).is_none());
    }

    #[test]
    fn single_model_takes_every_tier() {
        for tier_chain in [chain(&["small", "big"]), chain(&["big", "small"])] {
            let c = choose(&tier_chain, &[("big", Ready)]).unwrap();
            assert_eq!(c.index, 0);
        }
    }
}

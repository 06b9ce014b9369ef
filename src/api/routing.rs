//! The API side of routing beyond picking the model (mod.rs `target`): the client's
//! `X-Duet-Tier` correction, the per-tier generation policy (`[routing.tiers]`), and
//! confidence-driven escalation (`[routing.draft]`): the fast model drafts, its
//! log-probabilities decide whether the draft is returned or the request re-runs.

use super::{ApiError, AppState, Extras, Running, Target};
use crate::config::Tier;
use crate::router::{self, Decision};
use crate::serving::worker::ModelSlot;
use crate::serving::Options;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Instant;

tokio::task_local! {
    /// The tier a client forced with `X-Duet-Tier` for the request being handled.
    static FORCED_TIER: Option<Tier>;
}

/// Reads `X-Duet-Tier` (SIMPLE, MODERATE or COMPLEX; 400 otherwise) for the routing of
/// the request it comes with.
pub async fn read_forced_tier(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let tier = match req.headers().get("x-duet-tier") {
        None => None,
        Some(v) => match v.to_str().ok().and_then(router::cli::parse_tier) {
            Some(t) => Some(t),
            None => {
                return ApiError::bad_request("X-Duet-Tier must be SIMPLE, MODERATE or COMPLEX")
                    .into_response()
            }
        },
    };
    FORCED_TIER.scope(tier, next.run(req)).await
}

/// The tier forced by the request being handled, if any.
pub fn forced_tier() -> Option<Tier> {
    FORCED_TIER.try_with(|t| *t).ok().flatten()
}

impl Target {
    /// Applies the routed tier's generation policy (`[routing.tiers]`) to a request
    /// that set neither a system prompt nor num_predict: its system hint goes first in
    /// `messages`, its num_predict becomes the cap (the caller then applies the
    /// server's own with [`AppState::cap_predict`]).
    pub fn apply_tier_policy(
        &self,
        st: &AppState,
        messages: &mut Vec<crate::model::Message>,
        options: &mut Options,
    ) {
        let Some(r) = self.route.as_ref().filter(|r| !r.client_set) else {
            return;
        };
        let Some(p) = st.config.routing.tiers.of(r.decision.tier) else {
            return;
        };
        if let Some(sys) = &p.system {
            if !messages.iter().any(|m| m.role == "system") {
                messages.insert(0, crate::model::Message::new("system", sys));
            }
        }
        if let Some(n) = p.num_predict {
            options.num_predict = n;
        }
    }
}

impl AppState {
    /// The fast model that drafts an unsure MODERATE or COMPLEX decision first
    /// (`[routing.draft]`): the first ready model of the SIMPLE tier, when it is not the
    /// model picked.
    pub(super) fn draft_for(
        &self,
        d: &Decision,
        picked: &Arc<ModelSlot>,
    ) -> Option<Arc<ModelSlot>> {
        let policy = self.config.routing.draft.as_ref()?;
        let decided = matches!(d.by, router::DecidedBy::Learned | router::DecidedBy::Rules);
        if !decided || d.tier == Tier::Simple || d.confidence >= policy.below {
            return None;
        }
        let chain = self.chains.iter().find(|(t, _)| *t == Tier::Simple)?;
        let p = router::pick(&chain.1, &self.slots)?;
        (p.slot.name != picked.name
            && router::policy::Availability::of(&p.slot) == router::policy::Availability::Ready)
            .then_some(p.slot)
    }

    /// As [`submit_with`](Self::submit_with), drafting first where the route says so:
    /// the fast model answers, and its answer is returned when its log-probability
    /// signal passes `[routing.draft]`'s threshold; otherwise the request runs on its
    /// target as usual. A drafted answer reaches the client once complete.
    pub async fn submit_routed(
        &self,
        target: Target,
        prompt: Vec<u32>,
        options: Options,
        extras: Extras,
    ) -> Result<Running, ApiError> {
        use crate::serving::worker::Event;
        let draft_slot = target.route.as_ref().and_then(|r| r.draft.clone());
        let (Some(slot), Some(policy), None) = (
            draft_slot,
            self.config.routing.draft.clone(),
            extras.constraint.as_ref(),
        ) else {
            return self.submit_with(target, prompt, options, extras);
        };
        let start = Instant::now();
        let mut draft = Target {
            slot,
            requested: target.requested.clone(),
            routed: true,
            route: None,
            model: None,
            load_wait: Default::default(),
        };
        draft.model = Some(draft.slot.ready_model().await?);
        let top = router::draft::top_logprobs(policy.signal).max(extras.logprobs.unwrap_or(0));
        let mut running = self.submit_with(
            draft,
            prompt.clone(),
            options.clone(),
            Extras {
                constraint: None,
                logprobs: Some(top),
                score_from: None,
            },
        )?;
        let mut events = Vec::new();
        let mut tokens = Vec::new();
        let mut done = false;
        while let Some(ev) = running.events.rx.recv().await {
            if let Event::Logprobs(l) = &ev {
                tokens.extend(l.iter().cloned());
            }
            let end = matches!(ev, Event::Done(_) | Event::Error(_));
            done = matches!(ev, Event::Done(_));
            events.push(ev);
            if end {
                break;
            }
        }
        let audit_start = Instant::now();
        let signal = if policy.signal.is_audit() {
            let audited = self.audit(&target, &prompt, &options, &events).await;
            router::draft::value(policy.signal, &audited)
        } else {
            router::draft::value(policy.signal, &tokens)
        };
        let audit_ms = audit_start.elapsed().as_millis() as u64;
        let keep = done && router::draft::keep(&policy, signal);
        let log_id = target.route.as_ref().and_then(|r| r.log_id);
        if let (Some(log), Some(id)) = (&self.routing_log, log_id) {
            log.draft(id, signal, !keep, start.elapsed().as_millis() as u64);
        }
        tracing::info!(
            draft = %running.target.slot.name,
            model = %target.slot.name,
            ?signal,
            audit_ms,
            threshold = policy.threshold,
            escalated = !keep,
            "draft"
        );
        if !keep {
            // The draft ran: its generation is counted for its model.
            for ev in &events {
                running.events.recorder.observe(ev);
            }
            return self.submit_with(target, prompt, options, extras);
        }
        // Replayed as the worker sent it, with the log probabilities the client asked for.
        let (tx, rx) = tokio::sync::mpsc::channel(events.len().max(1));
        for ev in events {
            let ev = match (ev, extras.logprobs) {
                (Event::Logprobs(_), None) => continue,
                (Event::Logprobs(l), Some(k)) => Event::Logprobs(
                    l.into_iter()
                        .map(|mut t| {
                            t.top_logprobs.truncate(k);
                            t
                        })
                        .collect(),
                ),
                (ev, _) => ev,
            };
            let _ = tx.try_send(ev);
        }
        running.events.rx = rx;
        running.target.route = target.route;
        Ok(running)
    }

    /// The quality model's audit of a finished draft: the log probability of each token
    /// the draft generated, given the prompt and the draft before it, from one pass over
    /// both on `target` (nothing generated). Empty when the draft failed, generated
    /// nothing, or was cut or shifted (its context no longer starts with the prompt), or
    /// when the audit itself fails: the caller then escalates.
    async fn audit(
        &self,
        target: &Target,
        prompt: &[u32],
        options: &Options,
        draft_events: &[crate::serving::worker::Event],
    ) -> Vec<crate::serving::Logprob> {
        use crate::serving::worker::Event;
        let Some(Event::Done(summary)) = draft_events.last() else {
            return Vec::new();
        };
        let context = &summary.context;
        if context.len() <= prompt.len() || !context.starts_with(prompt) {
            return Vec::new();
        }
        let audit = Target {
            slot: target.slot.clone(),
            requested: target.requested.clone(),
            // Not a routed answer of its own: no time saved is credited to it.
            routed: false,
            route: None,
            model: target.model.clone(),
            load_wait: Default::default(),
        };
        let mut options = options.clone();
        options.num_ctx = options.num_ctx.max(context.len() + 1);
        let extras = super::Extras {
            constraint: None,
            logprobs: Some(0),
            score_from: Some(prompt.len()),
        };
        let mut running = match self.submit_with(audit, context.clone(), options, extras) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(model = %target.slot.name, error = %e.message, "the draft's audit could not start: escalated");
                return Vec::new();
            }
        };
        // Its work shows in the scheduler's metrics; it is not a generation of its own.
        running.events.recorder.silence();
        match super::stream::collect(running.events).await {
            Ok(c) => c.logprobs,
            Err(e) => {
                tracing::warn!(model = %target.slot.name, error = %e.message, "the draft's audit failed: escalated");
                Vec::new()
            }
        }
    }
}

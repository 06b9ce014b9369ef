//! The router: classify a request (classifier.rs: the learned head of learned.rs over
//! embeddings, with the keyword rules as override and fallback), then pick the first
//! available model of the tier's list (policy.rs). Only requests for `auto` or a routing
//! alias are routed; a request naming a model goes to that model. cli.rs is
//! `duet classify`; log.rs the decision log; draft.rs the escalation signal.

pub mod classifier;
pub mod cli;
pub mod draft;
pub mod learned;
pub mod log;
pub mod policy;

pub use classifier::{Classifier, DecidedBy, Decision, EmbedderSource, Request};
pub use policy::{pick, Pick};

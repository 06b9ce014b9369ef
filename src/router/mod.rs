//! The router: classify a request (classifier.rs), then pick the first available model of
//! the tier's list (policy.rs). Only requests for `auto` or a routing alias are routed; a
//! request naming a model goes to that model.

pub mod classifier;
pub mod policy;

pub use classifier::{Classifier, Decision, Request};
pub use policy::{pick, Pick};

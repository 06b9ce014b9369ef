//! The default deployment on a CPU-only machine with the weights fetched.

mod common;
use common::*;
use duet::layout::Deployment;
use duet::model::Model;

#[test]
fn default_layout_loads_two_distinct_real_models_on_two_cpu_devices() {
    let d = Deployment::new(config(), None).unwrap();
    // Built without CUDA, the gpu layout is skipped with a reason and cpu is chosen.
    assert_eq!(d.layout_name, "cpu");
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("'gpu'") && w.contains("CUDA")),
        "{:?}",
        d.warnings
    );
    let models: Vec<Model> = d
        .layout()
        .place
        .iter()
        .map(|p| {
            let m = d.model(&p.model).unwrap();
            Model::load(m.name, &m.weights.unwrap(), p.device).unwrap()
        })
        .collect();
    assert_eq!(models.len(), 2);
    assert_ne!(models[0].device, models[1].device);
    assert_ne!(
        models[0].info.parameter_count,
        models[1].info.parameter_count
    );
    assert_eq!(models[0].info.block_count, 24);
    assert_eq!(models[1].info.block_count, 28);
}

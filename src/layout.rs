//! Choosing where models run: pick the layout (flag, DUET_LAYOUT, or the first usable one
//! in `prefer`), then resolve each model name to its weights file and device.

use crate::config::{Config, ConfigError, DeviceSpec, Layout, ModelSpec, Tier};
use crate::hub::{self, HubError};
use crate::model::create_device;
use std::path::PathBuf;

/// The chosen layout of a configuration.
pub struct Deployment {
    pub config: Config,
    pub layout_name: String,
    /// One line per layout skipped by "auto", with the reason.
    pub warnings: Vec<String>,
}

/// A model as the deployment sees it: its weights (if found) and where it is placed.
pub struct ResolvedModel<'a> {
    pub name: &'a str,
    pub spec: &'a ModelSpec,
    pub weights: Result<PathBuf, HubError>,
    /// Device and tiers in the active layout, if it places this model.
    pub device: Option<DeviceSpec>,
    pub tiers: Vec<Tier>,
    pub threads: Option<usize>,
}

/// Why a layout cannot run here, or Ok when every device exists and all weights are on disk.
pub fn check_layout(cfg: &Config, layout: &Layout) -> Result<(), String> {
    let mut problems = Vec::new();
    for p in &layout.place {
        if p.device.is_cuda() {
            if let Err(e) = create_device(p.device) {
                problems.push(e.to_string());
                continue;
            }
        }
        if let Some(spec) = cfg.models.get(&p.model) {
            if let Err(e) = hub::resolve(cfg, &p.model, spec) {
                problems.push(e.to_string());
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

impl Deployment {
    pub fn new(config: Config, requested: Option<&str>) -> Result<Self, ConfigError> {
        let (layout_name, warnings) =
            config.choose_layout(requested, |l| check_layout(&config, l))?;
        Ok(Self {
            config,
            layout_name,
            warnings,
        })
    }

    pub fn layout(&self) -> &Layout {
        // choose_layout only returns names of defined layouts.
        &self.config.layouts[&self.layout_name]
    }

    /// Resolves a model name or alias; None when the configuration does not know it.
    pub fn model<'a>(&'a self, name: &'a str) -> Option<ResolvedModel<'a>> {
        let name = self.config.canonical_name(name)?;
        let spec = &self.config.models[name];
        let layout = self.layout();
        let placement = layout.place.iter().find(|p| p.model == name);
        Some(ResolvedModel {
            name,
            spec,
            weights: hub::resolve(&self.config, name, spec),
            device: placement.map(|p| p.device),
            tiers: placement.map(|p| p.tiers.clone()).unwrap_or_default(),
            threads: placement
                .filter(|p| !p.device.is_cuda())
                .map(|p| Config::cpu_threads(layout, p, available_cores())),
        })
    }

    /// Every configured model, those of the active layout first.
    pub fn models(&self) -> Vec<ResolvedModel<'_>> {
        let mut names: Vec<&str> = self
            .layout()
            .place
            .iter()
            .map(|p| p.model.as_str())
            .collect();
        for n in self.config.models.keys() {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        names.into_iter().filter_map(|n| self.model(n)).collect()
    }

    pub fn unknown_model_message(&self, name: &str) -> String {
        format!(
            "model '{name}' not found (models in {}: {})",
            self.config.origin,
            self.config
                .models
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

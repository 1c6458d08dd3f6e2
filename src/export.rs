//! Publishing: a self-contained Hugging Face-style folder — `model.safetensors` (EMA weights where
//! the run has them), `config.json`, the frozen encoders (`vae/`, `text_encoder/`, described by
//! `encoders.json`), `ATTRIBUTION.md`, and a `README.md` model card whose licence follows from the
//! data's licences — and the reader of that folder (`sample --model DIR`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use crate::config::{ModelConfig, RunSpec};
use crate::data::encode::frozen::FrozenEncoders;
use crate::data::encode::record::EncoderRecord;
use crate::data::encode::EncodeError;
use crate::data::licence::Licence;
use crate::data::manifest::Provenance;
use crate::model::Model;
use crate::run_model::{ModelSource, RunModel};
use crate::store::{Store, StoreError};
use crate::train::run::RunError;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Run(Box<RunError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Encode(Box<EncodeError>),
    #[error("{file}: {reason}")]
    Io { file: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<RunError> for ExportError {
    fn from(e: RunError) -> Self {
        ExportError::Run(Box::new(e))
    }
}

impl From<EncodeError> for ExportError {
    fn from(e: EncodeError) -> Self {
        ExportError::Encode(Box::new(e))
    }
}

/// Facts about the training run for the model card.
#[derive(Debug, Clone, Serialize)]
pub struct RunFacts {
    pub run_name: String,
    pub steps: u64,
    /// Which weights these are ("EMA of checkpoint 9000", "global model of round 12").
    pub weights: String,
    /// The training recipe ([`crate::config::TrainConfig::describe`]).
    pub recipe: String,
    pub hardware: String,
    pub wall_time_s: f64,
    pub metrics: Vec<(String, String)>,
}

/// Everything an export writes besides the model: facts, data provenance and the encoders.
pub struct Publication {
    pub facts: RunFacts,
    pub provenance: Provenance,
    /// `ATTRIBUTION.md` of the data, when credit is owed.
    pub attribution: Option<Vec<u8>>,
    pub encoders: EncoderRecord,
    /// The encoders' files, as (path inside the export, bytes).
    pub encoder_files: Vec<(String, Vec<u8>)>,
}

/// Gathers what a run's export needs from its store: the model of the run, its recipe and metrics,
/// and the encoders and provenance its data records.
pub fn collect(store: &Store, spec: &RunSpec, model: &RunModel) -> Result<Publication, ExportError> {
    let (data, record, provenance) = crate::train::run::data_record(store, spec)?;
    let attribution = match &provenance.attribution {
        Some(key) => data.get_opt(key)?.map(|b| b.to_vec()),
        None => None,
    };
    let vae = record.vae.moved("vae");
    let text = record.text.moved("text_encoder");
    let mut encoder_files = Vec::new();
    for (r, to) in [(&record.vae, &vae), (&record.text, &text)] {
        for (name, bytes) in r.read(&data)? {
            encoder_files.push((format!("{}/{name}", to.prefix), bytes));
        }
    }
    let (metrics, wall_time_s) = training_summary(store, spec, model)?;
    let facts = RunFacts {
        run_name: spec.name.clone(),
        steps: model.steps,
        weights: match model.source {
            ModelSource::Checkpoint { step } => format!("EMA weights of checkpoint {step}"),
            ModelSource::Commit { round } => format!("global model of DiLoCo round {round}"),
        },
        recipe: spec.train.describe(),
        hardware: hardware(store, spec),
        wall_time_s,
        metrics,
    };
    Ok(Publication { facts, provenance, attribution, encoders: EncoderRecord { vae, text }, encoder_files })
}

/// The training loss near the end, any evaluation the run stored, and the seconds from the first
/// recorded training event to the one behind the weights (each record read once).
fn training_summary(
    store: &Store,
    spec: &RunSpec,
    model: &RunModel,
) -> Result<(Vec<(String, String)>, f64), ExportError> {
    let mut out = Vec::new();
    let wall_s = match model.source {
        ModelSource::Checkpoint { .. } => {
            let metrics = crate::train::run::read_metrics(store)?;
            if !metrics.is_empty() {
                let tail = &metrics[metrics.len().saturating_sub(100)..];
                let loss = tail.iter().map(|m| m.stats.loss).sum::<f64>() / tail.len() as f64;
                out.push(("final training loss (mean of last 100 steps)".to_string(), format!("{loss:.4}")));
            }
            let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
            match (metrics.first().and_then(|m| parse(&m.time)), metrics.last().and_then(|m| parse(&m.time))) {
                (Some(a), Some(b)) => (b - a).num_milliseconds() as f64 / 1e3,
                _ => 0.0,
            }
        }
        ModelSource::Commit { round } => {
            let read =
                |r| crate::sync::protocol::read_commit(store, r).map_err(|e| ExportError::Invalid(e.to_string()));
            let mut losses = Vec::new();
            for r in round.saturating_sub(4)..=round {
                losses.extend(read(r)?.and_then(|c| c.mean_loss));
            }
            if !losses.is_empty() {
                let loss = losses.iter().sum::<f64>() / losses.len() as f64;
                out.push((
                    format!(
                        "final inner training loss (mean of the last {} rounds, H = {})",
                        losses.len(),
                        spec.sync.inner_steps
                    ),
                    format!("{loss:.4}"),
                ));
            }
            match (read(0)?, read(round)?) {
                (Some(a), Some(b)) => b.committed_ms.saturating_sub(a.committed_ms) as f64 / 1e3,
                _ => 0.0,
            }
        }
    };
    if let Some(f) = store.get_opt("eval/fidelity.json")? {
        let f: serde_json::Value = serde_json::from_slice(&f)
            .map_err(|e| ExportError::Invalid(format!("{}/eval/fidelity.json: {e}", store.url())))?;
        out.push(("prompt fidelity, all checks".to_string(), format!("{}", f["all"])));
    }
    Ok((out, wall_s))
}

/// The workers' hardware from their heartbeats (DiLoCo), else the spec's device.
fn hardware(store: &Store, spec: &RunSpec) -> String {
    let run_id = crate::train::run::read_run_id(store).ok().flatten().unwrap_or_default();
    let mut seen: Vec<String> = crate::sync::protocol::read_heartbeats(store, &run_id)
        .map(|hs| hs.into_iter().map(|h| h.hardware).collect())
        .unwrap_or_default();
    seen.sort();
    seen.dedup();
    if seen.is_empty() {
        format!("{} (as the spec names it)", spec.train.device)
    } else {
        seen.join("; ")
    }
}

/// The model card's licence, from the data's licences: all CC0/public domain → `cc0-1.0`; one
/// attribution family (CC BY, CC BY-SA, Apache, MIT) → that licence; a mix → the most
/// restrictive (share-alike above attribution-only above CC0), or `other` when two families of
/// the same rank differ. The card lists every licence with its sample count either way.
pub fn card_licence(licences: &BTreeMap<String, u64>) -> String {
    let parsed: Vec<Licence> = licences.keys().filter_map(|l| Licence::parse(l)).collect();
    if parsed.len() != licences.len() || parsed.is_empty() {
        return "other".into();
    }
    let rank = |l: &Licence| match l.family.as_str() {
        "cc0" | "pdm" => 0,
        "cc-by" | "apache" | "mit" => 1,
        "cc-by-sa" => 2,
        _ => 3,
    };
    let top = parsed.iter().map(rank).max().unwrap_or(0);
    // CC0 and the Public Domain Mark both put the work in the public domain: one family here.
    fn family_of(l: &Licence) -> &str {
        if l.family == "pdm" {
            "cc0"
        } else {
            l.family.as_str()
        }
    }
    let families: std::collections::BTreeSet<&str> = parsed.iter().filter(|l| rank(l) == top).map(family_of).collect();
    if top == 3 || families.len() > 1 {
        return "other".into();
    }
    let family = *families.iter().next().unwrap();
    let version = parsed.iter().filter(|l| l.family == family).filter_map(|l| l.version.clone()).max();
    match family {
        "cc0" | "pdm" => "cc0-1.0".into(),
        "apache" => "apache-2.0".into(),
        "mit" => "mit".into(),
        cc => format!("{cc}-{}", version.unwrap_or_else(|| "4.0".into())),
    }
}

#[derive(Serialize)]
struct ConfigJson<'a> {
    skytrain_version: &'a str,
    #[serde(flatten)]
    model: &'a ModelConfig,
    num_parameters: i64,
    objective: &'a str,
    latent_shape: [i64; 3],
    /// (tokens, width) of the text conditioning the model takes.
    text_conditioning: [i64; 2],
}

/// The encoder record inside an export.
pub const ENCODERS_FILE: &str = "encoders.json";

/// Writes the folder atomically: into `<out>.partial`, then renamed to `out`.
pub fn export(model: &Model, publication: &Publication, out: &Path) -> Result<(), ExportError> {
    let io =
        |file: &Path, e: std::io::Error| ExportError::Io { file: file.display().to_string(), reason: e.to_string() };
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let (text_tokens, text_dim) = model.config.text_shape();
    let objective = match model.prediction() {
        crate::config::Prediction::Velocity => "rectified-flow/velocity",
        crate::config::Prediction::X0 => "rectified-flow/x0",
    };
    let config = ConfigJson {
        skytrain_version: env!("CARGO_PKG_VERSION"),
        model: &model.config,
        num_parameters: model.num_params(),
        objective,
        latent_shape: model.config.latent_shape(),
        text_conditioning: [text_tokens, text_dim],
    };
    let facts = &publication.facts;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("skytrain.config".to_string(), serde_json::to_string(&model.config).unwrap()),
        ("skytrain.weights".to_string(), if facts.weights.starts_with("EMA") { "ema" } else { "global" }.to_string()),
        ("skytrain.steps".to_string(), facts.steps.to_string()),
    ]);
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("model.safetensors".into(), model.to_safetensors(Some(meta))),
        ("config.json".into(), serde_json::to_vec_pretty(&config).unwrap()),
        (ENCODERS_FILE.into(), serde_json::to_vec_pretty(&publication.encoders).unwrap()),
        ("README.md".into(), model_card(model, publication, objective).into_bytes()),
    ];
    if let Some(a) = &publication.attribution {
        files.push(("ATTRIBUTION.md".into(), a.clone()));
    }
    files.extend(publication.encoder_files.iter().cloned());
    for (name, bytes) in &files {
        let path = tmp.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| io(out, e))
}

/// Reads an exported folder back: the model and its encoders (every file checked against
/// `encoders.json`), for `sample --model DIR`.
pub fn load(dir: &Path) -> Result<(Model, FrozenEncoders), ExportError> {
    let config = dir.join("config.json");
    let cfg = ModelConfig::load(&config.display().to_string()).map_err(ExportError::Invalid)?;
    let mut model = Model::new(&cfg, tch::Device::Cpu).map_err(ExportError::Invalid)?;
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights)
        .map_err(|e| ExportError::Io { file: weights.display().to_string(), reason: e.to_string() })?;
    model.load_safetensors(&bytes, &weights.display().to_string()).map_err(|e| ExportError::Invalid(e.to_string()))?;
    let rec_path = dir.join(ENCODERS_FILE);
    let rec_bytes = std::fs::read(&rec_path)
        .map_err(|e| ExportError::Io { file: rec_path.display().to_string(), reason: e.to_string() })?;
    let record: EncoderRecord = serde_json::from_slice(&rec_bytes)
        .map_err(|e| ExportError::Io { file: rec_path.display().to_string(), reason: e.to_string() })?;
    let encoders = FrozenEncoders::from_dir(dir, &record)?;
    Ok((model, encoders))
}

fn model_card(model: &Model, publication: &Publication, objective: &str) -> String {
    let facts = &publication.facts;
    let data = &publication.provenance;
    let family = match &model.config {
        ModelConfig::Dit(c) => format!(
            "DiT (adaLN-Zero timestep modulation, cross-attention to {} text tokens of width {}): hidden {}, depth {}, heads {}, patch {}, {} text-refiner blocks, MLP activation {}",
            c.text_len, c.text_dim, c.hidden, c.depth, c.heads, c.patch_size, c.text_refiner, c.mlp_activation.name()
        ),
        ModelConfig::Tld(c) => format!(
            "TLD (AT-1 layout): embed_dim {}, {} layers, pooled text embedding of width {}",
            c.embed_dim, c.n_layers, c.text_emb_size
        ),
    };
    let licence = card_licence(&data.licences);
    let [lc, ls, _] = model.config.latent_shape();
    let mut s = String::new();
    s.push_str(&format!(
        "---\nlicense: {licence}\nlibrary_name: skytrain\ntags:\n- text-to-image\n- diffusion\n---\n\n# {}\n\n",
        facts.run_name
    ));
    s.push_str(
        "Trained with skytrain: a latent diffusion transformer over cached latents, text through cross-attention.\n\n",
    );
    s.push_str("## Architecture\n\n");
    s.push_str(&format!(
        "- {family}\n- Parameters: {}\n- Objective: {objective}\n- Latents: {lc}×{ls}×{ls}\n- Weights: {}, float32, `model.safetensors`\n",
        model.num_params(),
        facts.weights
    ));
    let enc = &publication.encoders;
    s.push_str(&format!(
        "- Image autoencoder: `{}/` ({:?}; {})\n- Text encoder: `{}/` ({:?}; {}; {} tokens)\n\n",
        enc.vae.prefix,
        enc.vae.kind,
        enc.vae.source,
        enc.text.prefix,
        enc.text.kind,
        enc.text.source,
        enc.text.max_tokens.map_or("-".into(), |t| t.to_string())
    ));
    s.push_str("## Training\n\n");
    s.push_str(&format!(
        "- Steps: {}\n- Recipe: {}\n- Hardware: {}\n- Wall time: {:.0} s\n\n",
        facts.steps, facts.recipe, facts.hardware, facts.wall_time_s
    ));
    s.push_str("## Metrics\n\n| metric | value |\n|---|---|\n");
    for (k, v) in &facts.metrics {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    s.push_str(&format!(
        "\n## Data, licences and attributions\n\nSource: {} ({} samples). The model card's licence, `{licence}`, \
         follows from the data's licences (the most restrictive of them).\n\n| licence | samples |\n|---|---|\n",
        data.source, data.samples
    ));
    for (l, n) in &data.licences {
        s.push_str(&format!("| {l} | {n} |\n"));
    }
    if publication.attribution.is_some() {
        s.push_str(
            "\nWorks whose licence requires credit are listed in `ATTRIBUTION.md`, shipped with these weights.\n",
        );
    } else {
        s.push_str("\nNo attribution is owed for these data.\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_licence_is_the_most_restrictive_of_the_data() {
        let of = |ls: &[&str]| card_licence(&ls.iter().map(|l| (l.to_string(), 1)).collect());
        assert_eq!(of(&["CC0-1.0", "PDM"]), "cc0-1.0");
        assert_eq!(of(&["CC0-1.0", "CC-BY-4.0"]), "cc-by-4.0");
        assert_eq!(of(&["CC-BY-4.0", "CC-BY-SA-3.0", "CC0-1.0"]), "cc-by-sa-3.0");
        assert_eq!(of(&["CC-BY-SA-4.0"]), "cc-by-sa-4.0");
        assert_eq!(of(&["Apache-2.0", "CC-BY-4.0"]), "other");
        assert_eq!(of(&["Apache-2.0"]), "apache-2.0");
        assert_eq!(of(&[]), "other");
    }
}

//! Publishing: a Hugging Face-style folder with `model.safetensors` (EMA weights, metadata),
//! `config.json`, and a `README.md` model card naming the data, its licences and attributions.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::config::ModelConfig;
use crate::model::Model;

/// One source of training data, as the model card lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DataSource {
    pub name: String,
    pub licence: String,
    pub attribution: String,
    pub samples: usize,
}

/// Facts about the training run for the model card.
#[derive(Debug, Clone, Serialize)]
pub struct RunFacts {
    pub run_name: String,
    pub steps: u64,
    /// The training recipe ([`crate::config::TrainConfig::describe`]).
    pub recipe: String,
    pub hardware: String,
    pub wall_time_s: f64,
    pub metrics: Vec<(String, String)>,
    pub data: Vec<DataSource>,
    /// Extra files to place beside the weights (name, bytes), e.g. the demo's encoders.
    #[serde(skip)]
    pub extra_files: Vec<(String, Vec<u8>)>,
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

/// Writes the folder atomically: into `<out>.partial`, then renamed to `out`.
pub fn export(model: &Model, facts: &RunFacts, out: &Path) -> std::io::Result<()> {
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
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
    let config_json = serde_json::to_string_pretty(&config).unwrap();
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("skytrain.config".to_string(), serde_json::to_string(&model.config).unwrap()),
        ("skytrain.weights".to_string(), "ema".to_string()),
        ("skytrain.steps".to_string(), facts.steps.to_string()),
    ]);
    std::fs::write(tmp.join("model.safetensors"), model.to_safetensors(Some(meta)))?;
    std::fs::write(tmp.join("config.json"), config_json)?;
    std::fs::write(tmp.join("README.md"), model_card(model, facts, objective))?;
    for (name, bytes) in &facts.extra_files {
        std::fs::write(tmp.join(name), bytes)?;
    }
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::rename(&tmp, out)
}

fn model_card(model: &Model, facts: &RunFacts, objective: &str) -> String {
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
    let [lc, ls, _] = model.config.latent_shape();
    let mut s = String::new();
    s.push_str(&format!(
        "---\nlicense: cc0-1.0\nlibrary_name: skytrain\ntags:\n- text-to-image\n- diffusion\n---\n\n# {}\n\n",
        facts.run_name
    ));
    s.push_str(
        "Trained with skytrain: a latent diffusion transformer over cached latents, text through cross-attention.\n\n",
    );
    s.push_str("## Architecture\n\n");
    s.push_str(&format!("- {family}\n- Parameters: {}\n- Objective: {objective}\n- Latents: {lc}×{ls}×{ls}\n- Weights: EMA, float32, `model.safetensors`\n\n", model.num_params()));
    s.push_str("## Training\n\n");
    s.push_str(&format!(
        "- Steps: {}\n- Recipe: {}\n- Hardware: {}\n- Wall time: {:.0} s\n\n",
        facts.steps, facts.recipe, facts.hardware, facts.wall_time_s
    ));
    s.push_str("## Metrics\n\n| metric | value |\n|---|---|\n");
    for (k, v) in &facts.metrics {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    s.push_str(
        "\n## Data, licences and attributions\n\n| source | licence | attribution | samples |\n|---|---|---|---|\n",
    );
    for d in &facts.data {
        s.push_str(&format!("| {} | {} | {} | {} |\n", d.name, d.licence, d.attribution, d.samples));
    }
    s
}

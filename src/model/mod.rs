//! Denoisers over VAE latents: `dit` (adaLN-Zero + cross-attention) and `tld` (AT-1's layout).
//! One file per family; this module gives both one interface.

pub mod dit;
pub mod layers;
pub mod tld;
pub mod weights;

use std::collections::HashMap;

use tch::{nn, Device, Kind, Tensor};

use crate::config::{ModelConfig, Prediction};
pub use weights::WeightsError;

/// Text conditioning for a batch: per-token embeddings `[B, L, T]` (cross-attention) and one
/// pooled vector `[B, T]` (adaLN for `dit`, the label token for `tld`).
#[derive(Debug)]
pub struct TextCond {
    pub tokens: Tensor,
    pub pooled: Tensor,
}

impl TextCond {
    pub fn to_device(&self, device: Device) -> TextCond {
        TextCond { tokens: self.tokens.to_device(device), pooled: self.pooled.to_device(device) }
    }

    /// Rows `idx` of a larger table of conditionings.
    pub fn select(&self, idx: &Tensor) -> TextCond {
        TextCond { tokens: self.tokens.index_select(0, idx), pooled: self.pooled.index_select(0, idx) }
    }

    /// Per-row choice: `mask` [B] bool true takes `other`'s row.
    pub fn where_mask(&self, mask: &Tensor, other: &TextCond) -> TextCond {
        let b = mask.size()[0];
        let m3 = mask.view([b, 1, 1]);
        let m2 = mask.view([b, 1]);
        TextCond {
            tokens: other.tokens.expand_as(&self.tokens).where_self(&m3, &self.tokens),
            pooled: other.pooled.expand_as(&self.pooled).where_self(&m2, &self.pooled),
        }
    }

    pub fn cat(a: &TextCond, b: &TextCond) -> TextCond {
        TextCond { tokens: Tensor::cat(&[&a.tokens, &b.tokens], 0), pooled: Tensor::cat(&[&a.pooled, &b.pooled], 0) }
    }
}

#[derive(Debug)]
enum Net {
    Dit(dit::Dit),
    Tld(tld::Tld),
}

/// A denoiser with its parameters (f32, on `device`) and the kind its matmuls run in.
pub struct Model {
    pub config: ModelConfig,
    pub device: Device,
    /// bf16 for mixed precision, f32 otherwise.
    pub compute: Kind,
    vs: nn::VarStore,
    net: Net,
    params: Vec<(String, Tensor)>,
}

impl Model {
    /// Builds a freshly initialised model; the global torch seed decides the init.
    pub fn new(config: &ModelConfig, device: Device) -> Result<Model, String> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let net = match config {
            ModelConfig::Dit(c) => Net::Dit(dit::Dit::new(&root, c)),
            ModelConfig::Tld(c) => Net::Tld(tld::Tld::new(&root, c)),
        };
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Model { config: config.clone(), device, compute: Kind::Float, vs, net, params })
    }

    /// Parameters by name, sorted: the order every optimizer state and update follows.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn num_params(&self) -> i64 {
        self.params.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    pub fn prediction(&self) -> Prediction {
        self.config.prediction()
    }

    pub fn forward(&self, x: &Tensor, sigma: &Tensor, text: &TextCond) -> Tensor {
        match &self.net {
            Net::Dit(m) => m.forward(x, sigma, text, self.compute),
            Net::Tld(m) => m.forward(x, sigma, text, self.compute),
        }
    }

    /// Velocity estimate `v = ε − x0` whatever the network predicts (samplers work in velocity).
    pub fn velocity(&self, x: &Tensor, sigma: &Tensor, text: &TextCond) -> Tensor {
        let out = self.forward(x, sigma, text);
        match self.prediction() {
            Prediction::Velocity => out,
            // x_t = (1−σ)x0 + σε  =>  v = (x_t − x0)/σ.
            Prediction::X0 => (x - out) / sigma.view([-1, 1, 1, 1]).clamp_min(1e-4),
        }
    }

    /// Weights as safetensors bytes.
    pub fn to_safetensors(&self, metadata: Option<HashMap<String, String>>) -> Vec<u8> {
        weights::to_safetensors(&self.params, metadata)
    }

    /// Loads weights from safetensors bytes; `file` names the source in errors.
    pub fn load_safetensors(&mut self, bytes: &[u8], file: &str) -> Result<(), WeightsError> {
        let loaded = weights::from_safetensors(bytes, file)?;
        let ignore: &[&str] = if matches!(self.net, Net::Tld(_)) { tld::BUFFERS } else { &[] };
        weights::load_into(&self.params, &loaded, file, ignore)
    }

    pub fn set_trainable(&mut self, trainable: bool) {
        if trainable {
            self.vs.unfreeze()
        } else {
            self.vs.freeze()
        }
    }
}

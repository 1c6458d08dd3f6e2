//! The demo's autoencoder, built rather than downloaded: PCA over p×p RGB patches of the training
//! images (the linear autoencoder with the least squared reconstruction error for its width),
//! computed in closed form. Latents are scaled to unit variance, as SD's scaling factor does.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::model::weights::{self, WeightsError};

pub struct PatchPca {
    pub patch: i64,
    pub channels: i64,
    /// [3·p·p]
    mean: Tensor,
    /// [3·p·p, channels], orthonormal columns.
    components: Tensor,
    scale: f64,
}

impl PatchPca {
    /// Fits on `images` [N, 3, H, W] in [0, 1].
    pub fn fit(images: &Tensor, patch: i64, channels: i64) -> PatchPca {
        Self::fit_many(std::slice::from_ref(images), patch, channels)
    }

    /// Fits on the patches of several image batches `[N_i, 3, H_i, W_i]` (one per size).
    pub fn fit_many(images: &[Tensor], patch: i64, channels: i64) -> PatchPca {
        let rows = Tensor::cat(&images.iter().map(|x| Self::patches(x, patch)).collect::<Vec<_>>(), 0);
        let mean = rows.mean_dim(0, false, Kind::Double);
        let centered = rows.to_kind(Kind::Double) - &mean;
        let cov = centered.transpose(0, 1).matmul(&centered) / rows.size()[0] as f64;
        let (_, vecs) = cov.linalg_eigh("L"); // ascending eigenvalues
        let d = vecs.size()[1];
        let mut components = vecs.narrow(1, d - channels, channels).flip([1]);
        // Fix each component's sign (largest-magnitude entry positive) so the fit is reproducible.
        let idx = components.abs().argmax(0, true);
        let signs = components.gather(0, &idx, false).sign();
        components = components * signs;
        let z = centered.matmul(&components);
        let scale = 1.0 / z.std(true).double_value(&[]);
        PatchPca {
            patch,
            channels,
            mean: mean.to_kind(Kind::Float),
            components: components.to_kind(Kind::Float),
            scale,
        }
    }

    /// [N, 3, H, W] -> [N·(H/p)·(W/p), 3·p·p]
    fn patches(images: &Tensor, p: i64) -> Tensor {
        let u = images.pixel_unshuffle(p); // [N, 3pp, H/p, W/p]
        let c = u.size()[1];
        u.permute([0, 2, 3, 1]).reshape([-1, c])
    }

    /// Images [N, 3, H, W] -> latents [N, channels, H/p, W/p].
    pub fn encode(&self, images: &Tensor) -> Tensor {
        let (n, _, h, w) = images.size4().unwrap();
        let p = self.patch;
        let z = (Self::patches(images, p) - &self.mean).matmul(&self.components) * self.scale;
        z.view([n, h / p, w / p, self.channels]).permute([0, 3, 1, 2]).contiguous()
    }

    /// Latents -> images [N, 3, H, W] (not clamped).
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let latents = latents.to_device(Device::Cpu).to_kind(Kind::Float);
        let (n, c, gh, gw) = latents.size4().unwrap();
        let z = latents.permute([0, 2, 3, 1]).reshape([-1, c]) / self.scale;
        let rows = z.matmul(&self.components.transpose(0, 1)) + &self.mean;
        let d = rows.size()[1];
        rows.view([n, gh, gw, d]).permute([0, 3, 1, 2]).pixel_shuffle(self.patch)
    }

    pub fn to_safetensors(&self) -> Vec<u8> {
        let meta = HashMap::from([
            ("patch".to_string(), self.patch.to_string()),
            ("scale".to_string(), self.scale.to_string()),
        ]);
        weights::to_safetensors(
            &[("mean".into(), self.mean.shallow_clone()), ("components".into(), self.components.shallow_clone())],
            Some(meta),
        )
    }

    pub fn from_safetensors(bytes: &[u8], file: &str) -> Result<PatchPca, WeightsError> {
        let mut t = weights::from_safetensors(bytes, file)?;
        let meta = weights::metadata(bytes, file)?;
        let missing = |name: &str| WeightsError::Missing { file: file.into(), name: name.into() };
        let mean = t.remove("mean").ok_or_else(|| missing("mean"))?;
        let components = t.remove("components").ok_or_else(|| missing("components"))?;
        let patch = meta.get("patch").and_then(|v| v.parse().ok()).ok_or_else(|| missing("metadata.patch"))?;
        let scale = meta.get("scale").and_then(|v| v.parse().ok()).ok_or_else(|| missing("metadata.scale"))?;
        let channels = components.size()[1];
        Ok(PatchPca { patch, channels, mean, components, scale })
    }
}

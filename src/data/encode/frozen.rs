//! The frozen encoders of a dataset, loaded from its record: prompts → text conditioning and
//! latents → images, whichever kind made the data (downloaded Hugging Face encoders or the
//! fitted ones skytrain builds itself).

use std::path::Path;

use tch::{Kind, Tensor};

use super::patch::PatchPca;
use super::record::{EncoderKind, EncoderRecord, EncoderRef};
use super::words::WordEncoder;
use super::{EncodeError, TextEncoder, Vae};
use crate::model::TextCond;
use crate::store::Store;

pub enum ImageCodec {
    Kl(Box<Vae>),
    Patch(PatchPca),
}

pub enum TextCodec {
    Hf(Box<TextEncoder>),
    Words(WordEncoder),
}

pub struct FrozenEncoders {
    pub image: ImageCodec,
    pub text: TextCodec,
}

/// A word encoder's captions as a `TextCond` batch.
pub fn words_cond(enc: &WordEncoder, captions: &[String]) -> Result<TextCond, EncodeError> {
    let mut tokens = Vec::new();
    let mut pooled = Vec::new();
    for c in captions {
        let (t, p) = enc.encode(c).map_err(EncodeError::Invalid)?;
        tokens.extend(t);
        pooled.extend(p);
    }
    let n = captions.len() as i64;
    Ok(TextCond {
        tokens: Tensor::from_slice(&tokens).view([n, enc.len as i64, enc.dim as i64]),
        pooled: Tensor::from_slice(&pooled).view([n, enc.dim as i64]),
    })
}

impl FrozenEncoders {
    /// Loads both encoders of `record` from `store` (files verified against their hashes).
    pub fn from_store(store: &Store, record: &EncoderRecord) -> Result<FrozenEncoders, EncodeError> {
        Ok(FrozenEncoders {
            image: image_codec(&record.vae, record.vae.read(store)?)?,
            text: text_codec(&record.text, record.text.read(store)?)?,
        })
    }

    /// Loads both from a local folder laid out as the record says (an exported model).
    pub fn from_dir(root: &Path, record: &EncoderRecord) -> Result<FrozenEncoders, EncodeError> {
        Ok(FrozenEncoders {
            image: image_codec(&record.vae, record.vae.read_dir(root)?)?,
            text: text_codec(&record.text, record.text.read_dir(root)?)?,
        })
    }

    /// Loads a diffusers `AutoencoderKL` folder and a transformers text-encoder folder directly.
    pub fn from_folders(vae: &Path, text: &Path, max_tokens: Option<usize>) -> Result<FrozenEncoders, EncodeError> {
        Ok(FrozenEncoders {
            image: ImageCodec::Kl(Box::new(Vae::load(vae)?)),
            text: TextCodec::Hf(Box::new(TextEncoder::load(text, max_tokens)?)),
        })
    }

    /// Prompts → the conditioning the denoiser takes (on the CPU).
    pub fn text(&self, captions: &[String]) -> Result<TextCond, EncodeError> {
        match &self.text {
            TextCodec::Hf(enc) => {
                let (tokens, pooled) = enc.encode(captions)?;
                Ok(TextCond { tokens, pooled })
            }
            TextCodec::Words(enc) => words_cond(enc, captions),
        }
    }

    /// Latents `[B, C, h, w]` → RGB images `[B, 3, H, W]` in [0, 1] (on the CPU).
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let z = latents.to_device(tch::Device::Cpu).to_kind(Kind::Float);
        match &self.image {
            ImageCodec::Kl(vae) => ((vae.decode(&z) + 1.0) / 2.0).clamp(0.0, 1.0),
            ImageCodec::Patch(ae) => ae.decode(&z).clamp(0.0, 1.0),
        }
    }
}

/// The single file of a one-file encoder.
fn single(r: &EncoderRef, files: Vec<(String, Vec<u8>)>) -> Result<(String, Vec<u8>), EncodeError> {
    let mut files = files.into_iter();
    match (files.next(), files.next()) {
        (Some(f), None) => Ok(f),
        _ => Err(EncodeError::Invalid(format!("encoder `{}` ({:?}) must have exactly one file", r.prefix, r.kind))),
    }
}

/// Folder encoders load from disk: their files go to a private temporary folder first.
fn in_folder<T>(
    files: Vec<(String, Vec<u8>)>,
    load: impl FnOnce(&Path) -> Result<T, EncodeError>,
) -> Result<T, EncodeError> {
    let dir =
        tempfile::tempdir().map_err(|e| EncodeError::Io { file: "temporary folder".into(), reason: e.to_string() })?;
    for (name, bytes) in files {
        let path = dir.path().join(&name);
        std::fs::write(&path, bytes)
            .map_err(|e| EncodeError::Io { file: path.display().to_string(), reason: e.to_string() })?;
    }
    load(dir.path())
}

fn image_codec(r: &EncoderRef, files: Vec<(String, Vec<u8>)>) -> Result<ImageCodec, EncodeError> {
    match r.kind {
        EncoderKind::AutoencoderKl => Ok(ImageCodec::Kl(Box::new(in_folder(files, Vae::load)?))),
        EncoderKind::PatchPca => {
            let (name, bytes) = single(r, files)?;
            let file = format!("{}/{name}", r.prefix);
            PatchPca::from_safetensors(&bytes, &file)
                .map(ImageCodec::Patch)
                .map_err(|e| EncodeError::Weights { file, reason: e.to_string() })
        }
        other => Err(EncodeError::Invalid(format!("encoder `{}`: {other:?} is not an image autoencoder", r.prefix))),
    }
}

fn text_codec(r: &EncoderRef, files: Vec<(String, Vec<u8>)>) -> Result<TextCodec, EncodeError> {
    match r.kind {
        EncoderKind::HfText => Ok(TextCodec::Hf(Box::new(in_folder(files, |d| TextEncoder::load(d, r.max_tokens))?))),
        EncoderKind::Words => {
            let (name, bytes) = single(r, files)?;
            let file = format!("{}/{name}", r.prefix);
            WordEncoder::from_safetensors(&bytes, &file)
                .map(TextCodec::Words)
                .map_err(|e| EncodeError::Weights { file, reason: e.to_string() })
        }
        other => Err(EncodeError::Invalid(format!("encoder `{}`: {other:?} is not a text encoder", r.prefix))),
    }
}

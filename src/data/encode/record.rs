//! Which frozen encoders made a dataset's latents and text embeddings. Cached embeddings mean
//! nothing without them, so their files travel with the data (copied into the dataset's store,
//! each with its sha256) and the record sits in the dataset manifest, or beside a run's cached
//! latents file: `sample`, `export` and `sample --model` find them without flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::EncodeError;
use crate::store::{sha256_hex, Store};

/// The loader an encoder's files are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncoderKind {
    /// A diffusers `AutoencoderKL` folder (`config.json` + weights).
    AutoencoderKl,
    /// skytrain's fitted patch autoencoder (one safetensors file).
    PatchPca,
    /// A transformers CLIP text model or BERT/MiniLM folder (config, weights, tokenizer).
    HfText,
    /// skytrain's closed-vocabulary word encoder (one safetensors file).
    Words,
}

/// One encoder: its files under `prefix` of the store (or folder) that holds the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderRef {
    pub kind: EncoderKind,
    pub prefix: String,
    /// File name → sha256.
    pub files: BTreeMap<String, String>,
    /// Where it was loaded from at encoding time (a path or a Hugging Face id), for people.
    pub source: String,
    /// Tokens the text encoder pads to (text encoders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
}

/// The image autoencoder and the text encoder of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderRecord {
    pub vae: EncoderRef,
    pub text: EncoderRef,
}

/// Where a folder-based encoder's loader reads from (diffusers pipelines nest the VAE in `vae/`
/// and the text model in `text_encoder/`), and the files it reads there that exist.
pub fn hf_files(kind: EncoderKind, dir: &Path) -> Vec<(String, PathBuf)> {
    let (sub, names): (&str, &[&str]) = match kind {
        EncoderKind::AutoencoderKl => {
            ("vae", &["config.json", "diffusion_pytorch_model.safetensors", "model.safetensors"])
        }
        EncoderKind::HfText => (
            "text_encoder",
            &[
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "special_tokens_map.json",
                "modules.json",
                "sentence_bert_config.json",
            ],
        ),
        EncoderKind::PatchPca | EncoderKind::Words => return vec![],
    };
    let dir = if dir.join(sub).join("config.json").exists() { dir.join(sub) } else { dir.to_path_buf() };
    names.iter().map(|n| (n.to_string(), dir.join(n))).filter(|(_, p)| p.is_file()).collect()
}

impl EncoderRef {
    /// Copies `files` into `store` under `prefix`, recording each file's hash.
    pub fn store_files(
        kind: EncoderKind,
        files: &[(String, Vec<u8>)],
        store: &Store,
        prefix: &str,
        source: &str,
        max_tokens: Option<usize>,
    ) -> Result<EncoderRef, EncodeError> {
        let mut hashes = BTreeMap::new();
        for (name, bytes) in files {
            hashes.insert(name.clone(), sha256_hex(bytes));
            store.put(&format!("{prefix}/{name}"), bytes.clone())?;
        }
        Ok(EncoderRef { kind, prefix: prefix.into(), files: hashes, source: source.into(), max_tokens })
    }

    /// Reads a local encoder folder's files (see [`hf_files`]) and stores them.
    pub fn store_folder(
        kind: EncoderKind,
        dir: &Path,
        store: &Store,
        prefix: &str,
        max_tokens: Option<usize>,
    ) -> Result<EncoderRef, EncodeError> {
        let mut files = Vec::new();
        for (name, path) in hf_files(kind, dir) {
            let bytes = std::fs::read(&path)
                .map_err(|e| EncodeError::Io { file: path.display().to_string(), reason: e.to_string() })?;
            files.push((name, bytes));
        }
        Self::store_files(kind, &files, store, prefix, &dir.display().to_string(), max_tokens)
    }

    /// Each file's bytes from `store`, verified against the record.
    pub fn read(&self, store: &Store) -> Result<Vec<(String, Vec<u8>)>, EncodeError> {
        let mut out = Vec::new();
        for (name, sha) in &self.files {
            out.push((name.clone(), store.get_verified(&format!("{}/{name}", self.prefix), sha)?.to_vec()));
        }
        Ok(out)
    }

    /// Each file's bytes from a local folder holding the record's layout, verified.
    pub fn read_dir(&self, root: &Path) -> Result<Vec<(String, Vec<u8>)>, EncodeError> {
        let mut out = Vec::new();
        for (name, sha) in &self.files {
            let path = root.join(&self.prefix).join(name);
            let file = path.display().to_string();
            let bytes =
                std::fs::read(&path).map_err(|e| EncodeError::Io { file: file.clone(), reason: e.to_string() })?;
            let actual = sha256_hex(&bytes);
            if &actual != sha {
                return Err(EncodeError::Io {
                    file,
                    reason: format!("sha256 {actual} does not match the recorded {sha}"),
                });
            }
            out.push((name.clone(), bytes));
        }
        Ok(out)
    }

    /// The same encoder under another prefix (an export's `vae/`, `text_encoder/`).
    pub fn moved(&self, prefix: &str) -> EncoderRef {
        EncoderRef { prefix: prefix.into(), ..self.clone() }
    }

    /// Same loader and byte-identical files, wherever they are stored.
    pub fn same_encoder(&self, other: &EncoderRef) -> bool {
        self.kind == other.kind && self.files == other.files
    }
}

impl EncoderRecord {
    /// Why embeddings made under `self` and under `other` cannot be compared, if they cannot: the
    /// first encoder whose files differ, with both hashes.
    pub fn mismatch(&self, other: &EncoderRecord) -> Option<String> {
        [("image autoencoder", &self.vae, &other.vae), ("text encoder", &self.text, &other.text)]
            .into_iter()
            .find(|(_, a, b)| !a.same_encoder(b))
            .map(|(what, a, b)| format!("{what} {:?} {:?} ≠ {:?} {:?}", a.kind, a.files, b.kind, b.files))
    }
}

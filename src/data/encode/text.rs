//! Frozen text encoders in the transformers layout: CLIP text model (per-token states and the
//! pooled EOS state, as SD pipelines use them) and BERT/MiniLM (mean pooling weighted by the
//! attention mask, as sentence-transformers does), each with its `tokenizer.json`.

use std::path::Path;

use tch::{Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::hf::{activation, known_activation, read_config, Config, HfWeights, Linear};
use super::EncodeError;

/// Token ids and attention mask `[B, L]`.
pub struct Tokens {
    pub ids: Tensor,
    pub mask: Tensor,
}

/// A `tokenizer.json` padded and truncated to a fixed length.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without truncation or padding, to count a caption's tokens.
    counter: Tokenizer,
    pub max_len: usize,
}

impl TextTokenizer {
    pub fn load(dir: &Path, max_len: usize, default_pad: &str) -> Result<TextTokenizer, EncodeError> {
        let path = dir.join("tokenizer.json");
        let file = path.display().to_string();
        let mut inner =
            Tokenizer::from_file(&path).map_err(|e| EncodeError::Io { file: file.clone(), reason: e.to_string() })?;
        // The pad token a checkpoint was trained with lives in special_tokens_map.json.
        let pad_token = std::fs::read_to_string(dir.join("special_tokens_map.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                let p = v.get("pad_token")?;
                p.as_str().map(String::from).or_else(|| p.get("content")?.as_str().map(String::from))
            })
            .unwrap_or_else(|| default_pad.to_string());
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| EncodeError::Config {
            file: file.clone(),
            reason: format!("pad token `{pad_token}` is not in the vocabulary"),
        })?;
        let mut counter = inner.clone();
        counter.with_padding(None);
        counter.with_truncation(None).map_err(|e| EncodeError::Config { file: file.clone(), reason: e.to_string() })?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            pad_id,
            pad_token,
            ..Default::default()
        }));
        let mut t = TextTokenizer { inner, counter, max_len };
        t.set_max_len(max_len)?;
        Ok(t)
    }

    /// Pads and truncates to `max_len` tokens from now on.
    pub fn set_max_len(&mut self, max_len: usize) -> Result<(), EncodeError> {
        let bad = |e: tokenizers::Error| EncodeError::Config { file: "tokenizer.json".into(), reason: e.to_string() };
        self.inner
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(bad)?;
        if let Some(p) = self.inner.get_padding_mut() {
            p.strategy = PaddingStrategy::Fixed(max_len);
        }
        self.max_len = max_len;
        Ok(())
    }

    /// Tokens `text` takes, special tokens included, without truncation.
    pub fn count(&self, text: &str) -> Result<usize, EncodeError> {
        let enc = self
            .counter
            .encode(text, true)
            .map_err(|e| EncodeError::Config { file: "tokenizer.json".into(), reason: e.to_string() })?;
        Ok(enc.len())
    }

    pub fn encode(&self, texts: &[String]) -> Result<Tokens, EncodeError> {
        let enc = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EncodeError::Config { file: "tokenizer.json".into(), reason: e.to_string() })?;
        let ids: Vec<i64> = enc.iter().flat_map(|e| e.get_ids().iter().map(|&i| i as i64)).collect();
        let mask: Vec<i64> = enc.iter().flat_map(|e| e.get_attention_mask().iter().map(|&i| i as i64)).collect();
        let shape = [texts.len() as i64, self.max_len as i64];
        Ok(Tokens { ids: Tensor::from_slice(&ids).view(shape), mask: Tensor::from_slice(&mask).view(shape) })
    }
}

struct Layer {
    norm1: (Tensor, Tensor),
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm2: (Tensor, Tensor),
    fc1: Linear,
    fc2: Linear,
}

fn layer_norm(x: &Tensor, (w, b): &(Tensor, Tensor), eps: f64) -> Tensor {
    x.layer_norm([w.size()[0]], Some(w), Some(b), eps, true)
}

/// Multi-head attention with an additive mask `[B, 1, L|1, L]`.
fn attend(x: &Tensor, q: &Linear, k: &Linear, v: &Linear, heads: i64, mask: &Tensor) -> Tensor {
    let (b, l, d) = x.size3().unwrap();
    let split = |t: Tensor| t.view([b, l, heads, d / heads]).transpose(1, 2);
    let a = Tensor::scaled_dot_product_attention(
        &split(q.forward(x)),
        &split(k.forward(x)),
        &split(v.forward(x)),
        Some(mask),
        0.0,
        false,
        None,
        false,
    );
    a.transpose(1, 2).contiguous().view([b, l, d])
}

/// The text model of CLIP (`CLIPTextModel`): pre-norm transformer with a causal mask.
pub struct Clip {
    token: Tensor,
    position: Tensor,
    layers: Vec<Layer>,
    final_norm: (Tensor, Tensor),
    heads: i64,
    eps: f64,
    act: String,
    eos_id: i64,
    pub dim: i64,
    pub tokenizer: TextTokenizer,
    pub name: String,
}

impl Clip {
    pub fn load(dir: &Path, cfg: &Config, max_len: Option<usize>) -> Result<Clip, EncodeError> {
        let d = cfg.int("hidden_size")?;
        let heads = cfg.int("num_attention_heads")?;
        let inter = cfg.int("intermediate_size")?;
        let n = cfg.int("num_hidden_layers")?;
        let vocab = cfg.int("vocab_size")?;
        let max_pos = cfg.int_or("max_position_embeddings", 77)?;
        let act = cfg.str_or("hidden_act", "quick_gelu")?;
        if !known_activation(&act) {
            return Err(cfg.bad("hidden_act", "a known activation (quick_gelu, gelu, ...)"));
        }
        let w = HfWeights::load(&dir.join("model.safetensors"))?;
        let p = if w.keys().any(|k| k.starts_with("text_model.")) { "text_model." } else { "" };
        let layers = (0..n)
            .map(|i| {
                let l = format!("{p}encoder.layers.{i}");
                Ok(Layer {
                    norm1: w.norm(&format!("{l}.layer_norm1"), d)?,
                    q: w.linear(&format!("{l}.self_attn.q_proj"), d, d)?,
                    k: w.linear(&format!("{l}.self_attn.k_proj"), d, d)?,
                    v: w.linear(&format!("{l}.self_attn.v_proj"), d, d)?,
                    o: w.linear(&format!("{l}.self_attn.out_proj"), d, d)?,
                    norm2: w.norm(&format!("{l}.layer_norm2"), d)?,
                    fc1: w.linear(&format!("{l}.mlp.fc1"), d, inter)?,
                    fc2: w.linear(&format!("{l}.mlp.fc2"), inter, d)?,
                })
            })
            .collect::<Result<Vec<_>, EncodeError>>()?;
        let max_len = max_len.unwrap_or(max_pos as usize).min(max_pos as usize);
        Ok(Clip {
            token: w.get(&format!("{p}embeddings.token_embedding.weight"), &[vocab, d])?,
            position: w.get(&format!("{p}embeddings.position_embedding.weight"), &[max_pos, d])?,
            layers,
            final_norm: w.norm(&format!("{p}final_layer_norm"), d)?,
            heads,
            eps: cfg.float_or("layer_norm_eps", 1e-5)?,
            act,
            eos_id: cfg.int_or("eos_token_id", 2)?,
            dim: d,
            tokenizer: TextTokenizer::load(dir, max_len, "<|endoftext|>")?,
            name: format!("CLIPTextModel {}", dir.display()),
        })
    }

    /// Per-token last hidden states `[B, L, D]` and the pooled EOS state `[B, D]`. Like SD
    /// pipelines, no padding mask: padding tokens attend causally like any other.
    pub fn forward(&self, t: &Tokens) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let (b, l) = t.ids.size2().unwrap();
            let mut x = self.token.index_select(0, &t.ids.view([-1])).view([b, l, self.dim])
                + self.position.narrow(0, 0, l).unsqueeze(0);
            let causal = Tensor::ones([l, l], (Kind::Float, tch::Device::Cpu)).triu(1) * -1e9;
            let mask = causal.view([1, 1, l, l]);
            for layer in &self.layers {
                let h = layer_norm(&x, &layer.norm1, self.eps);
                x = &x + layer.o.forward(&attend(&h, &layer.q, &layer.k, &layer.v, self.heads, &mask));
                let h = layer_norm(&x, &layer.norm2, self.eps);
                x = &x + layer.fc2.forward(&activation(&self.act, &layer.fc1.forward(&h)));
            }
            let x = layer_norm(&x, &self.final_norm, self.eps);
            // transformers: legacy configs (eos_token_id 2) take the highest id, others the first EOS.
            let eos = if self.eos_id == 2 {
                t.ids.argmax(-1, false)
            } else {
                t.ids.eq(self.eos_id).to_kind(Kind::Int).argmax(-1, false)
            };
            let pooled = x.index_select(1, &eos).diagonal(0, 0, 1).transpose(0, 1);
            (x, pooled)
        })
    }
}

/// BERT (MiniLM, sentence-transformers): post-norm encoder, mean pooling over real tokens.
pub struct Bert {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: (Tensor, Tensor),
    layers: Vec<Layer>,
    heads: i64,
    eps: f64,
    act: String,
    normalize: bool,
    pub dim: i64,
    pub tokenizer: TextTokenizer,
    pub name: String,
}

impl Bert {
    pub fn load(dir: &Path, cfg: &Config, max_len: Option<usize>) -> Result<Bert, EncodeError> {
        let d = cfg.int("hidden_size")?;
        let heads = cfg.int("num_attention_heads")?;
        let inter = cfg.int("intermediate_size")?;
        let n = cfg.int("num_hidden_layers")?;
        let vocab = cfg.int("vocab_size")?;
        let max_pos = cfg.int_or("max_position_embeddings", 512)?;
        let types = cfg.int_or("type_vocab_size", 2)?;
        let act = cfg.str_or("hidden_act", "gelu")?;
        if !known_activation(&act) {
            return Err(cfg.bad("hidden_act", "a known activation (gelu, relu, ...)"));
        }
        let w = HfWeights::load(&dir.join("model.safetensors"))?;
        let p = if w.keys().any(|k| k.starts_with("bert.")) { "bert." } else { "" };
        let layers = (0..n)
            .map(|i| {
                let l = format!("{p}encoder.layer.{i}");
                Ok(Layer {
                    q: w.linear(&format!("{l}.attention.self.query"), d, d)?,
                    k: w.linear(&format!("{l}.attention.self.key"), d, d)?,
                    v: w.linear(&format!("{l}.attention.self.value"), d, d)?,
                    o: w.linear(&format!("{l}.attention.output.dense"), d, d)?,
                    norm1: w.norm(&format!("{l}.attention.output.LayerNorm"), d)?,
                    fc1: w.linear(&format!("{l}.intermediate.dense"), d, inter)?,
                    fc2: w.linear(&format!("{l}.output.dense"), inter, d)?,
                    norm2: w.norm(&format!("{l}.output.LayerNorm"), d)?,
                })
            })
            .collect::<Result<Vec<_>, EncodeError>>()?;
        // sentence-transformers lists a Normalize module when embeddings are unit length.
        let normalize = std::fs::read_to_string(dir.join("modules.json")).is_ok_and(|m| m.contains("Normalize"));
        let seq = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("max_seq_length")?.as_u64())
            .unwrap_or(max_pos as u64) as usize;
        let max_len = max_len.unwrap_or(seq).min(max_pos as usize);
        Ok(Bert {
            word: w.get(&format!("{p}embeddings.word_embeddings.weight"), &[vocab, d])?,
            position: w.get(&format!("{p}embeddings.position_embeddings.weight"), &[max_pos, d])?,
            token_type: w.get(&format!("{p}embeddings.token_type_embeddings.weight"), &[types, d])?,
            emb_norm: w.norm(&format!("{p}embeddings.LayerNorm"), d)?,
            layers,
            heads,
            eps: cfg.float_or("layer_norm_eps", 1e-12)?,
            act,
            normalize,
            dim: d,
            tokenizer: TextTokenizer::load(dir, max_len, "[PAD]")?,
            name: format!("BertModel {}", dir.display()),
        })
    }

    /// Per-token states `[B, L, D]` (padding positions zeroed) and the masked mean `[B, D]`
    /// (unit length when the model folder says so).
    pub fn forward(&self, t: &Tokens) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let (b, l) = t.ids.size2().unwrap();
            let mut x = self.word.index_select(0, &t.ids.view([-1])).view([b, l, self.dim])
                + self.position.narrow(0, 0, l).unsqueeze(0)
                + self.token_type.get(0).view([1, 1, self.dim]);
            x = layer_norm(&x, &self.emb_norm, self.eps);
            let maskf = t.mask.to_kind(Kind::Float);
            let additive: Tensor = (maskf.ones_like() - &maskf) * -1e9;
            let additive = additive.view([b, 1, 1, l]);
            for layer in &self.layers {
                let a = layer.o.forward(&attend(&x, &layer.q, &layer.k, &layer.v, self.heads, &additive));
                x = layer_norm(&(&x + a), &layer.norm1, self.eps);
                let h = layer.fc2.forward(&activation(&self.act, &layer.fc1.forward(&x)));
                x = layer_norm(&(&x + h), &layer.norm2, self.eps);
            }
            let m = maskf.unsqueeze(-1);
            let tokens = &x * &m;
            let mut pooled = tokens.sum_dim_intlist(1, false, Kind::Float)
                / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
            if self.normalize {
                pooled = &pooled / pooled.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12);
            }
            (tokens, pooled)
        })
    }
}

/// A frozen text encoder chosen by the folder's `config.json`.
pub enum TextEncoder {
    Clip(Clip),
    Bert(Bert),
}

impl TextEncoder {
    /// Loads a transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`); a
    /// sentence-transformers package folder works too. `max_len` overrides the token length.
    pub fn load(dir: &Path, max_len: Option<usize>) -> Result<TextEncoder, EncodeError> {
        let dir =
            if dir.join("text_encoder/config.json").exists() { dir.join("text_encoder") } else { dir.to_path_buf() };
        let (path, v) = read_config(&dir)?;
        let cfg = Config { file: path.display().to_string(), v: &v };
        let model_type = cfg.str_or("model_type", "")?;
        match model_type.as_str() {
            "clip_text_model" | "clip" => Ok(TextEncoder::Clip(Clip::load(&dir, &cfg, max_len)?)),
            "bert" => Ok(TextEncoder::Bert(Bert::load(&dir, &cfg, max_len)?)),
            _ => Err(cfg.bad("model_type", "`clip_text_model` or `bert`")),
        }
    }

    /// `(tokens [B, L, D], pooled [B, D])` for a batch of captions.
    pub fn encode(&self, texts: &[String]) -> Result<(Tensor, Tensor), EncodeError> {
        match self {
            TextEncoder::Clip(m) => Ok(m.forward(&m.tokenizer.encode(texts)?)),
            TextEncoder::Bert(m) => Ok(m.forward(&m.tokenizer.encode(texts)?)),
        }
    }

    fn tokenizer_mut(&mut self) -> &mut TextTokenizer {
        match self {
            TextEncoder::Clip(m) => &mut m.tokenizer,
            TextEncoder::Bert(m) => &mut m.tokenizer,
        }
    }

    fn tokenizer(&self) -> &TextTokenizer {
        match self {
            TextEncoder::Clip(m) => &m.tokenizer,
            TextEncoder::Bert(m) => &m.tokenizer,
        }
    }

    /// Tokens `text` takes, special tokens included.
    pub fn count_tokens(&self, text: &str) -> Result<usize, EncodeError> {
        self.tokenizer().count(text)
    }

    /// Encodes to `len` tokens from now on; at most the length the encoder was loaded with.
    pub fn shorten(&mut self, len: usize) -> Result<(), EncodeError> {
        let max = self.tokenizer().max_len;
        self.tokenizer_mut().set_max_len(len.clamp(1, max))
    }

    /// `(L, D)` of the per-token output.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            TextEncoder::Clip(m) => (m.tokenizer.max_len, m.dim as usize),
            TextEncoder::Bert(m) => (m.tokenizer.max_len, m.dim as usize),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            TextEncoder::Clip(m) => &m.name,
            TextEncoder::Bert(m) => &m.name,
        }
    }
}

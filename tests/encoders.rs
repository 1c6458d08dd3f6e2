//! The frozen encoders against their reference implementations: a random-weight diffusers
//! AutoencoderKL and transformers CLIPTextModel (fixtures made by
//! tests/python/make_encoder_fixtures.py), and the real all-MiniLM-L6-v2 weights against
//! sentence-transformers' output.

mod common;

use std::collections::BTreeMap;

use skytrain::data::encode::{TextEncoder, Vae};
use skytrain::model::weights;
use tch::{Kind, Tensor};

fn reference(file: &str) -> (BTreeMap<String, Tensor>, Vec<String>) {
    let path = common::fixtures().join(file);
    let bytes = std::fs::read(&path).unwrap();
    let t = weights::from_safetensors(&bytes, file).unwrap();
    let captions = weights::metadata(&bytes, file)
        .unwrap()
        .get("captions")
        .map(|c| serde_json::from_str(c).unwrap())
        .unwrap_or_default();
    (t, captions)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

#[test]
fn vae_matches_diffusers() {
    let (r, _) = reference("reference.safetensors");
    let vae = Vae::load(&common::fixtures().join("vae-tiny")).unwrap();
    assert_eq!((vae.latent_channels, vae.factor, vae.scaling_factor), (4, 2, 0.3));
    let (mean, logvar) = vae.moments(&r["vae.x"]);
    assert!(max_diff(&mean, &r["vae.mean"]) < 1e-4, "mean {}", max_diff(&mean, &r["vae.mean"]));
    assert!(max_diff(&logvar, &r["vae.logvar"]) < 1e-4);
    let z = vae.encode(&r["vae.x"], None);
    assert!(max_diff(&z, &r["vae.latent"]) < 1e-4);
    let y = vae.decode(&z);
    let d = max_diff(&y, &r["vae.decoded"]);
    assert!(d < 1e-4, "decoded differs by {d}");
    // And it is not trivially passing: a wrong scaling factor moves the latents.
    assert!(max_diff(&(z / 0.3 * 0.18215), &r["vae.latent"]) > 1e-3);
}

#[test]
fn clip_text_matches_transformers() {
    let (r, captions) = reference("reference.safetensors");
    assert_eq!(captions.len(), 4);
    let enc = TextEncoder::load(&common::fixtures().join("clip-tiny"), None).unwrap();
    assert_eq!(enc.shape(), (77, 32));
    let TextEncoder::Clip(clip) = &enc else { panic!("not CLIP") };
    let ids = clip.tokenizer.encode(&captions).unwrap().ids;
    assert_eq!(ids, r["clip.ids"], "tokenizer.json ids differ from transformers'");
    let (tokens, pooled) = enc.encode(&captions).unwrap();
    let (dt, dp) = (max_diff(&tokens, &r["clip.tokens"]), max_diff(&pooled, &r["clip.pooled"]));
    assert!(dt < 1e-4 && dp < 1e-4, "tokens {dt}, pooled {dp}");
}

#[test]
fn minilm_matches_sentence_transformers() {
    let (r, _) = reference("minilm-reference.safetensors");
    let captions: Vec<String> =
        ["a red cat", "the cat", "", "an emoji of grinning face, face smiling, smileys & emotion"]
            .map(String::from)
            .to_vec();
    let enc = TextEncoder::load(&common::minilm_dir(), Some(32)).unwrap();
    assert_eq!(enc.shape(), (32, 384));
    let TextEncoder::Bert(bert) = &enc else { panic!("not BERT") };
    let t = bert.tokenizer.encode(&captions).unwrap();
    assert_eq!(t.ids, r["ids"]);
    assert_eq!(t.mask, r["mask"]);
    let (tokens, pooled) = enc.encode(&captions).unwrap();
    let (dt, dp) = (max_diff(&tokens, &r["tokens"]), max_diff(&pooled, &r["pooled"]));
    assert!(dt < 1e-4 && dp < 1e-5, "tokens {dt}, pooled {dp}");
    // Unit-length sentence embeddings (the package lists a Normalize module).
    let norms = pooled.norm_scalaropt_dim(2.0, [-1], false);
    assert!(max_diff(&norms, &Tensor::ones([4], (Kind::Float, tch::Device::Cpu))) < 1e-5);
}

#[test]
fn broken_encoder_folders_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let vae = dir.path().join("vae");
    std::fs::create_dir_all(&vae).unwrap();
    let src = common::fixtures().join("vae-tiny");
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(vae.join("config.json"), cfg.replace("\"latent_channels\": 4", "\"latent_channels\": 8")).unwrap();
    std::fs::copy(src.join("diffusion_pytorch_model.safetensors"), vae.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let err = Vae::load(&vae).err().unwrap().to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("encoder.conv_out.weight"), "{err}");
    std::fs::write(vae.join("config.json"), "{\"_class_name\": \"AutoencoderKL\"}").unwrap();
    let err = Vae::load(&vae).err().unwrap().to_string();
    assert!(err.contains("config.json") && err.contains("block_out_channels"), "{err}");
    let err = TextEncoder::load(dir.path(), None).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");
}

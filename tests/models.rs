//! Model families: AT-1's `tld` layout against an independent numpy implementation of the spec,
//! AT-1's parameter count, and DiT's adaLN-Zero start.

mod common;

use std::process::Command;

use skytrain::config::{Activation, DitConfig, ModelConfig, TldConfig};
use skytrain::model::{weights, Model, TextCond};
use tch::{Device, Kind, Tensor};

/// libtorch's default generator is one per process and the tests of this file share it: each
/// takes this lock, so a seeded test draws its numbers without another test reseeding in between.
fn global_rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn tld_matches_numpy_reference_of_the_at1_spec() {
    let _rng = global_rng();
    let cfg = TldConfig {
        embed_dim: 128,
        n_layers: 2,
        latent_size: 8,
        noise_embed_dims: 32,
        text_emb_size: 24,
        ..TldConfig::default()
    };
    tch::manual_seed(5);
    let model = Model::new(&ModelConfig::Tld(cfg.clone()), Device::Cpu).unwrap();
    // Randomise LayerNorm affines too, so a swapped or missing norm cannot hide.
    tch::no_grad(|| {
        for (name, p) in model.params() {
            if name.contains("norm") {
                let mut p = p.shallow_clone();
                p.copy_(&(Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 0.3 + 1.0));
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    // AT-1 state dicts carry two buffers: include them, as a converted checkpoint would.
    let mut named: Vec<(String, Tensor)> = model.params().iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let f = cfg.noise_embed_dims / 2;
    named.push((
        "fourier_feats.0.angular_speeds".into(),
        Tensor::linspace(0.0, 1000f64.ln(), f, (Kind::Float, Device::Cpu)).exp() * (2.0 * std::f64::consts::PI),
    ));
    let wpath = dir.path().join("w.safetensors");
    std::fs::write(&wpath, weights::to_safetensors(&named, None)).unwrap();
    // Loading it back (buffers accepted) gives the same model.
    let mut reloaded = Model::new(&ModelConfig::Tld(cfg.clone()), Device::Cpu).unwrap();
    reloaded.load_safetensors(&std::fs::read(&wpath).unwrap(), "w.safetensors").unwrap();

    let b = 2;
    let x = Tensor::randn([b, 4, 8, 8], (Kind::Float, Device::Cpu));
    let sigma = Tensor::from_slice(&[0.3f32, 0.8]);
    let label = Tensor::randn([b, 24], (Kind::Float, Device::Cpu));
    let text = TextCond { tokens: label.unsqueeze(1), pooled: label.shallow_clone() };
    let out = tch::no_grad(|| reloaded.forward(&x, &sigma, &text));
    let inputs = vec![("x".to_string(), x), ("sigma".to_string(), sigma.view([b, 1])), ("label".to_string(), label)];
    let ipath = dir.path().join("in.safetensors");
    std::fs::write(&ipath, weights::to_safetensors(&inputs, None)).unwrap();
    let cpath = dir.path().join("cfg.json");
    std::fs::write(&cpath, serde_json::to_string(&cfg).unwrap()).unwrap();
    let opath = dir.path().join("out.safetensors");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/tld_reference.py");
    let status = Command::new(common::python()).args([script]).args([&wpath, &ipath, &opath, &cpath]).status().unwrap();
    assert!(status.success());
    let reference = weights::from_safetensors(&std::fs::read(&opath).unwrap(), "out").unwrap().remove("out").unwrap();
    let diff = (out - reference).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "tld output differs from the numpy reference by {diff}");
}

#[test]
fn at1_config_has_at1_parameter_count() {
    let _rng = global_rng();
    let m = tch::no_grad(|| Model::new(&ModelConfig::named("tld-at1").unwrap(), Device::Cpu)).unwrap();
    assert_eq!(m.num_params(), 23_049_536);
}

/// `mlp_activation` reaches every MLP: the same weights give slightly different outputs with the
/// exact GELU than with its tanh approximation (the two differ by < 1e-3 per activation).
#[test]
fn dit_mlp_activation_is_configurable() {
    let _rng = global_rng();
    let cfg = |mlp_activation| {
        ModelConfig::Dit(DitConfig {
            hidden: 32,
            depth: 1,
            heads: 2,
            latent_size: 4,
            text_dim: 8,
            text_len: 3,
            freq_dim: 16,
            text_refiner: 1,
            mlp_activation,
            ..DitConfig::default()
        })
    };
    let opts = (Kind::Float, Device::Cpu);
    tch::manual_seed(2);
    let weights = Tensor::randn([Model::new(&cfg(Activation::Gelu), Device::Cpu).unwrap().flat().numel() as i64], opts);
    let x = Tensor::randn([2, 4, 4, 4], opts);
    let text = TextCond { tokens: Tensor::randn([2, 3, 8], opts), pooled: Tensor::randn([2, 8], opts) };
    let sigma = Tensor::from_slice(&[0.3f32, 0.7]);
    let outputs: Vec<Tensor> = [Activation::Gelu, Activation::GeluTanh]
        .into_iter()
        .map(|act| {
            let model = Model::new(&cfg(act), Device::Cpu).unwrap();
            tch::no_grad(|| model.flat().shallow_clone().copy_(&weights));
            model.forward(&x, &sigma, &text)
        })
        .collect();
    let diff = (&outputs[0] - &outputs[1]).abs().max().double_value(&[]);
    let scale = outputs[0].abs().max().double_value(&[]);
    assert!(diff > 0.0 && diff < 1e-2 * scale, "difference {diff} at output scale {scale}");
    let toml = "name = \"n\"\n[model]\nfamily = \"dit\"\nmlp_activation = \"relu\"\n";
    let err = skytrain::config::RunSpec::from_toml(toml, "n.toml").unwrap_err();
    assert!(err.contains("mlp_activation") && err.contains("gelu-tanh"), "{err}");
}

#[test]
fn dit_starts_as_zero_and_learns() {
    let _rng = global_rng();
    let cfg = ModelConfig::Dit(DitConfig {
        hidden: 64,
        depth: 2,
        heads: 2,
        latent_size: 8,
        text_dim: 16,
        text_len: 4,
        freq_dim: 32,
        ..DitConfig::default()
    });
    tch::manual_seed(1);
    let model = Model::new(&cfg, Device::Cpu).unwrap();
    let x = Tensor::randn([3, 4, 8, 8], (Kind::Float, Device::Cpu));
    let text = TextCond {
        tokens: Tensor::randn([3, 4, 16], (Kind::Float, Device::Cpu)),
        pooled: Tensor::randn([3, 16], (Kind::Float, Device::Cpu)),
    };
    let sigma = Tensor::from_slice(&[0.1f32, 0.5, 0.9]);
    let out = model.forward(&x, &sigma, &text);
    assert_eq!(out.size(), vec![3, 4, 8, 8]);
    assert_eq!(out.abs().max().double_value(&[]), 0.0, "adaLN-Zero: the output layer starts at zero");
    // Model::backward accumulates autograd's per-parameter gradients into one flat buffer that the
    // parameters' .grad()s are views of.
    let mut model = model;
    assert!(!model.grad().defined(), "a model that never trained holds no gradient buffer");
    let target = Tensor::randn([3, 4, 8, 8], (Kind::Float, Device::Cpu));
    let loss_of = |m: &Model| (m.forward(&x, &sigma, &text) - &target).square().mean(Kind::Float);
    let params: Vec<&Tensor> = model.params().iter().map(|(_, p)| p).collect();
    let reference = Tensor::run_backward(&[loss_of(&model)], &params, false, false);
    for round in 1..=2 {
        model.backward(&loss_of(&model)); // accumulates: round 2 holds twice the gradient
        let views = model.flat_views(model.grad());
        assert_eq!(views.len(), model.params().len());
        for (((name, g), (pname, p)), r) in views.iter().zip(model.params()).zip(&reference) {
            assert_eq!(name, pname);
            assert!(g.allclose(&(r * round as f64), 1e-6, 1e-7, false), "gradient of {name}, round {round}");
            assert_eq!(p.grad().data_ptr(), g.data_ptr(), "{name}'s .grad() is a view into the flat buffer");
        }
    }
    model.zero_grad();
    assert_eq!(model.grad().abs().max().double_value(&[]), 0.0);
    model.backward(&loss_of(&model));
    let views = model.flat_views(&model.grad().copy());
    assert!(model.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    // Parameters are views into the flat buffer: AdamW's update of it is the model's update.
    let before: Vec<Tensor> = model.params().iter().map(|(_, p)| p.detach().copy()).collect();
    let mut opt = skytrain::train::optim::AdamW::new(&model, &skytrain::config::TrainConfig::default());
    opt.step(&model, 1e-3);
    for (((name, p), b), (_, g)) in model.params().iter().zip(&before).zip(&views) {
        let has_grad = g.abs().max().double_value(&[]) > 0.0;
        assert_eq!(!p.equal(b), has_grad, "{name} moved iff it has a gradient (no weight decay)");
    }
    assert!(model.flat_views(model.flat()).iter().zip(model.params()).all(|((_, v), (_, p))| v.equal(p)));
    // The loss falls on a fixed batch.
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..30 {
        let loss = loss_of(&model);
        model.zero_grad();
        model.backward(&loss);
        last = loss.double_value(&[]);
        first.get_or_insert(last);
        opt.step(&model, 3e-3);
    }
    assert!(last < first.unwrap() * 0.9, "loss {} -> {last}", first.unwrap());
    // Any grid of patches (aspect-ratio buckets): a wide latent keeps its shape, and its left
    // square is not the square latent's output (positions follow the grid, not a fixed table).
    let wide = Tensor::randn([3, 4, 8, 16], (Kind::Float, Device::Cpu));
    let out = model.forward(&wide, &sigma, &text);
    assert_eq!(out.size(), vec![3, 4, 8, 16]);
    assert!(out.isfinite().all().int64_value(&[]) == 1);
    let tall = model.forward(&wide.transpose(2, 3).contiguous(), &sigma, &text);
    assert_eq!(tall.size(), vec![3, 4, 16, 8]);
}

#[test]
fn samplers_are_deterministic_for_a_seed_and_follow_at1s_update() {
    let _rng = global_rng();
    let cfg = TldConfig {
        embed_dim: 64,
        n_layers: 1,
        latent_size: 8,
        noise_embed_dims: 16,
        text_emb_size: 8,
        ..TldConfig::default()
    };
    tch::manual_seed(2);
    let model = Model::new(&ModelConfig::Tld(cfg), Device::Cpu).unwrap();
    let label = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
    let text = TextCond { tokens: label.unsqueeze(1), pooled: label.shallow_clone() };
    let zeros = Tensor::zeros([1, 8], (Kind::Float, Device::Cpu));
    let null = TextCond { tokens: zeros.unsqueeze(1), pooled: zeros };
    use skytrain::sample::{at1, euler, initial_noise};
    let a = at1(&model, &text, &null, 10, 4.5, 7);
    assert!(a.equal(&at1(&model, &text, &null, 10, 4.5, 7)));
    assert!(!a.equal(&at1(&model, &text, &null, 10, 4.5, 8)));
    let sampler = skytrain::sample::Euler { steps: 5, guidance: 3.0, shift: 1.0 };
    let e = euler(&model, &text, &null, sampler, 7);
    assert!(e.equal(&euler(&model, &text, &null, sampler, 7)));
    assert!(!e.equal(&euler(&model, &text, &null, skytrain::sample::Euler { shift: 3.0, ..sampler }, 7)));
    // Two levels (1, ½): one step, returning the guided x0 estimate at σ = 1.
    let x = initial_noise(&model, 2, 7);
    let one = Tensor::ones([2], (Kind::Float, Device::Cpu));
    let nulls = TextCond { tokens: null.tokens.expand_as(&text.tokens), pooled: null.pooled.expand_as(&text.pooled) };
    let want = tch::no_grad(|| model.forward(&x, &one, &text) * 4.5 + model.forward(&x, &one, &nulls) * (1.0 - 4.5));
    let got = at1(&model, &text, &null, 2, 4.5, 7);
    assert!((got - want).abs().max().double_value(&[]) < 1e-5);
}

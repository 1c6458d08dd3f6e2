//! `demo`, `demo-data` and `fidelity`: the embedded pipeline, a client of the core.

use anyhow::{bail, Result};

use skytrain::config::ModelConfig;
use skytrain::demo;
use skytrain::encode::frozen::{FrozenEncoders, ImageCodec, TextCodec};
use skytrain::store::Store;
use skytrain::{run, run_model, sample};

pub fn demo_data(store: &str, images: usize, seed: u64) -> Result<()> {
    let store = Store::create(store)?;
    let model = ModelConfig::named("dit-tiny").expect("a named config");
    demo::prepare_data(&store, &model, images, seed)?;
    println!("{images} images curated and encoded into {}", store.url());
    Ok(())
}

/// Prompt fidelity of a run on the demo's shapes data (its model and its fitted encoders).
pub fn fidelity(store: &str, images: usize, sampler: sample::Euler, seed: u64) -> Result<()> {
    let store = Store::open(store)?;
    let spec = run::read_spec(&store)?;
    let rm = run_model::latest_model(&store, &spec)?;
    let mut model = skytrain::model::Model::new(&spec.model, tch::Device::Cpu).map_err(anyhow::Error::msg)?;
    model.load_safetensors(&rm.weights, &rm.key)?;
    let (data, record, _) = run::data_record(&store, &spec)?;
    let FrozenEncoders { image: ImageCodec::Patch(ae), text: TextCodec::Words(enc) } =
        FrozenEncoders::from_store(&data, &record)?
    else {
        bail!(
            "{}: prompt fidelity checks the demo's shapes; this run's data was encoded with other encoders",
            store.url()
        )
    };
    let captions = demo::eval_captions(images, seed);
    let f = demo::measure_fidelity(&model, &ae, &enc, &captions, sampler, seed + 7)?;
    println!("{}", serde_json::to_string(&f)?);
    Ok(())
}

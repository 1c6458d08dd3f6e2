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
///
/// The trainable parameters are views into one flat buffer (matrices first), so gradient
/// clipping, AdamW and the EMA are a handful of kernels over one tensor instead of several per
/// parameter: on a GPU a small model's step is otherwise dominated by kernel launches.
pub struct Model {
    pub config: ModelConfig,
    pub device: Device,
    /// bf16 for mixed precision, f32 otherwise (see [`Model::set_compute`]).
    compute: Kind,
    vs: nn::VarStore,
    net: Net,
    params: Vec<(String, Tensor)>,
    flat: FlatLayout,
    /// The trainable parameters in `compute` kind when it is not f32.
    copies: Option<ComputeCopies>,
}

/// Where each trainable parameter lives in the flat buffer.
struct FlatLayout {
    buffer: Tensor,
    /// Gradients, laid out like `buffer`; the parameters' `.grad()`s become views into it.
    /// Allocated by the first backward, so models that only sample or export never pay for it.
    grad: Tensor,
    /// Whether every parameter's `.grad()` is a view into `grad` yet (they exist after a backward).
    grads_attached: bool,
    /// (index into `params`, offset) in buffer order: matrices (weight-decayed) first.
    slots: Vec<(usize, i64)>,
    /// Elements at the front of the buffer that get weight decay (parameters of rank ≥ 2).
    decayed: i64,
}

impl FlatLayout {
    /// Moves every parameter that requires grad into one buffer and makes it a view of it.
    fn build(params: &mut [(String, Tensor)], device: Device) -> FlatLayout {
        let mut order: Vec<usize> = (0..params.len()).filter(|&i| params[i].1.requires_grad()).collect();
        order.sort_by_key(|&i| params[i].1.dim() < 2); // stable: name order within each group
        let total: i64 = order.iter().map(|&i| params[i].1.numel() as i64).sum();
        let decayed = order.iter().filter(|&&i| params[i].1.dim() >= 2).map(|&i| params[i].1.numel() as i64).sum();
        let buffer = Tensor::zeros([total], (Kind::Float, device));
        let mut slots = Vec::with_capacity(order.len());
        let mut offset = 0;
        tch::no_grad(|| {
            for &i in &order {
                let p = &mut params[i].1;
                let n = p.numel() as i64;
                let mut view = buffer.narrow(0, offset, n).view(p.size().as_slice());
                view.copy_(p);
                p.set_data(&view);
                slots.push((i, offset));
                offset += n;
            }
        });
        FlatLayout { buffer, grad: Tensor::new(), grads_attached: false, slots, decayed }
    }
}

/// The trainable parameters converted to the compute kind, laid out like the flat buffer and
/// refreshed from it by one conversion per forward. The layers use these copies instead of
/// converting each weight where it is used: for dit-tiny that is ~100 conversions fewer per forward
/// and as many in the backward. The copies' gradients collect in `grad` (each has one use per
/// forward, so they hold exactly what the conversion's backward would have produced) and are
/// added into the f32 gradient after each backward: the same numbers, fewer kernels.
struct ComputeCopies {
    buffer: Tensor,
    /// Allocated by the first backward, like [`FlatLayout::grad`].
    grad: Tensor,
    /// Leaf tensors viewing `buffer`, in `FlatLayout::slots` order.
    leaves: Vec<Tensor>,
    /// The same leaves by their f32 parameter's data address, for [`layers::Compute::param`].
    by_param: HashMap<usize, Tensor>,
}

impl ComputeCopies {
    fn build(params: &[(String, Tensor)], flat: &FlatLayout, kind: Kind) -> ComputeCopies {
        let buffer = flat.buffer.to_kind(kind).detach();
        let mut leaves = Vec::with_capacity(flat.slots.len());
        let mut by_param = HashMap::with_capacity(flat.slots.len());
        tch::no_grad(|| {
            for &(i, offset) in &flat.slots {
                let p = &params[i].1;
                let shape = p.size();
                let mut leaf = Tensor::zeros(shape.as_slice(), (kind, p.device())).set_requires_grad(true);
                leaf.set_data(&buffer.narrow(0, offset, p.numel() as i64).view(shape.as_slice()));
                by_param.insert(p.data_ptr() as usize, leaf.shallow_clone());
                leaves.push(leaf);
            }
        });
        ComputeCopies { buffer, grad: Tensor::new(), leaves, by_param }
    }
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
        let flat = FlatLayout::build(&mut params, device);
        Ok(Model { config: config.clone(), device, compute: Kind::Float, vs, net, params, flat, copies: None })
    }

    /// The kind matmuls and attention run in: f32, or bf16 for mixed precision (parameters,
    /// gradients and optimizer state stay f32 either way).
    pub fn set_compute(&mut self, kind: Kind) {
        self.compute = kind;
        self.copies = (kind != Kind::Float).then(|| ComputeCopies::build(&self.params, &self.flat, kind));
        // Gradients now reach new tensors (the copies, or the f32 parameters again): attach anew.
        self.flat.grads_attached = false;
    }

    pub fn compute(&self) -> Kind {
        self.compute
    }

    /// The trainable parameters as one flat f32 buffer (the parameters are views into it).
    pub fn flat(&self) -> &Tensor {
        &self.flat.buffer
    }

    /// How many elements at the front of [`Model::flat`] get weight decay (the matrices).
    pub fn decayed_len(&self) -> i64 {
        self.flat.decayed
    }

    /// Backpropagates `loss`, adding its gradient to [`Model::grad`] (as `.backward()` adds to
    /// `.grad()`): after the first call every parameter's gradient is a view into that buffer, so
    /// autograd accumulates straight into it and no copy or gather is needed.
    pub fn backward(&mut self, loss: &Tensor) {
        loss.backward();
        if !self.flat.grads_attached {
            self.attach_grads();
        }
        if let Some(copies) = &mut self.copies {
            // Each slot has its gradient in one of the two buffers and zero in the other.
            tch::no_grad(|| {
                let _ = self.flat.grad.g_add_(&copies.grad);
                let _ = copies.grad.zero_();
            });
        }
    }

    /// Makes every gradient autograd allocated a view into the flat gradient buffers (its f32
    /// parameter's, or its compute copy's), so later backwards accumulate straight into them.
    fn attach_grads(&mut self) {
        self.allocate_grad();
        if let Some(copies) = &mut self.copies {
            if !copies.grad.defined() {
                copies.grad = copies.buffer.zeros_like();
            }
        }
        let mut all = true;
        tch::no_grad(|| {
            for (k, &(i, offset)) in self.flat.slots.iter().enumerate() {
                let p = &self.params[i].1;
                let n = p.numel() as i64;
                let mut used = false;
                let copy = self.copies.as_ref().map(|c| (&c.leaves[k], &c.grad));
                for (t, buffer) in std::iter::once((p, &self.flat.grad)).chain(copy) {
                    let mut g = t.grad();
                    if !g.defined() {
                        continue;
                    }
                    used = true;
                    let mut view = buffer.narrow(0, offset, n).view(p.size().as_slice());
                    if g.data_ptr() != view.data_ptr() {
                        view.copy_(&g);
                        g.set_data(&view);
                    }
                }
                all &= used; // a parameter unused by this loss is attached once it has a gradient
            }
        });
        self.flat.grads_attached = all;
    }

    /// The gradients [`Model::backward`] accumulated, laid out like [`Model::flat`] (an undefined
    /// tensor until the first `backward` or `zero_grad`).
    pub fn grad(&self) -> &Tensor {
        &self.flat.grad
    }

    /// Adds `grad` (laid out like [`Model::flat`]) to the accumulated gradients.
    pub fn add_grad(&mut self, grad: &Tensor) {
        let _ = self.flat.grad.g_add_(grad);
    }

    /// Clears the accumulated gradients (one kernel).
    pub fn zero_grad(&mut self) {
        if self.flat.grad.defined() {
            let _ = self.flat.grad.zero_();
        }
        self.allocate_grad();
    }

    /// Allocates the (zero) gradient buffer the first time it is needed.
    fn allocate_grad(&mut self) {
        if !self.flat.grad.defined() {
            self.flat.grad = self.flat.buffer.zeros_like();
        }
    }

    /// Named views into a tensor laid out like [`Model::flat`] (optimizer moments, EMA), in
    /// parameter-name order; untrainable parameters are left out.
    pub fn flat_views(&self, like_flat: &Tensor) -> Vec<(String, Tensor)> {
        let mut views: Vec<(usize, Tensor)> = self
            .flat
            .slots
            .iter()
            .map(|&(i, offset)| {
                let p = &self.params[i].1;
                (i, like_flat.narrow(0, offset, p.numel() as i64).view(p.size().as_slice()))
            })
            .collect();
        views.sort_by_key(|(i, _)| *i);
        views.into_iter().map(|(i, t)| (self.params[i].0.clone(), t)).collect()
    }

    /// Parameters by name, sorted: the order every optimizer state and update follows.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn num_params(&self) -> i64 {
        self.params.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// One forward pass on zeros at σ 0.5 (a check that loaded weights run): the output's shape,
    /// mean and standard deviation.
    pub fn probe_forward(&self) -> (Vec<i64>, f64, f64) {
        let [c, h, w] = self.config.latent_shape();
        let (l, t) = self.config.text_shape();
        let zeros = |shape: &[i64]| Tensor::zeros(shape, (tch::Kind::Float, self.device));
        let text = TextCond { tokens: zeros(&[1, l, t]), pooled: zeros(&[1, t]) };
        let sigma = Tensor::from_slice(&[0.5f32]).to_device(self.device);
        let out = tch::no_grad(|| self.forward(&zeros(&[1, c, h, w]), &sigma, &text));
        (out.size(), out.mean(tch::Kind::Float).double_value(&[]), out.std(true).double_value(&[]))
    }

    pub fn prediction(&self) -> Prediction {
        self.config.prediction()
    }

    pub fn forward(&self, x: &Tensor, sigma: &Tensor, text: &TextCond) -> Tensor {
        let cx = match &self.copies {
            Some(copies) => {
                // The f32 weights may have changed since the last forward (optimizer, loading).
                tch::no_grad(|| copies.buffer.shallow_clone().copy_(&self.flat.buffer));
                layers::Compute::with_copies(self.compute, &copies.by_param)
            }
            None => layers::Compute::plain(self.compute),
        };
        match &self.net {
            Net::Dit(m) => m.forward(x, sigma, text, cx),
            Net::Tld(m) => m.forward(x, sigma, text, cx),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 copies must change only the kernel count: the same loss and the same f32
    /// gradients, bit for bit, as converting each weight where it is used, also after the f32
    /// weights change (the copies are refreshed), with two backwards accumulated, and with the
    /// copies rebuilt between them.
    #[test]
    fn compute_copies_give_the_gradients_of_per_weight_conversions() {
        let cfg = ModelConfig::named("dit-tiny").unwrap();
        let (b, [c, s, _], (l, t)) = (4, cfg.latent_shape(), cfg.text_shape());
        let opts = (Kind::Float, Device::Cpu);
        // Other tests draw from the global generator concurrently: every random tensor is drawn
        // once and shared, not re-drawn from a seed.
        let x = Tensor::randn([b, c, s, s], opts);
        let sigma = Tensor::rand([b], opts);
        let text = TextCond { tokens: Tensor::randn([b, l, t], opts), pooled: Tensor::randn([b, t], opts) };
        let mut with_copies = Model::new(&cfg, Device::Cpu).unwrap();
        with_copies.set_compute(Kind::BFloat16);
        let mut converting = Model::new(&cfg, Device::Cpu).unwrap();
        // No copies: `Compute::param` converts each weight in the graph.
        converting.compute = Kind::BFloat16;
        // The same weights, with non-zero adaLN and output layers so every weight gets a gradient.
        let weights = with_copies.flat() + Tensor::randn_like(with_copies.flat()) * 0.02;
        for m in [&with_copies, &converting] {
            tch::no_grad(|| m.flat().shallow_clone().copy_(&weights));
        }
        for round in 0..2 {
            let mut losses = Vec::new();
            for m in [&mut with_copies, &mut converting] {
                if round == 0 {
                    m.zero_grad();
                }
                let loss = m.forward(&x, &sigma, &text).square().mean(Kind::Float);
                m.backward(&loss);
                losses.push(loss.double_value(&[]));
            }
            assert_eq!(losses[0], losses[1], "round {round}: losses differ");
            assert!(with_copies.grad().equal(converting.grad()), "round {round}: gradients differ");
            let zero = with_copies.grad().eq(0.0).sum(Kind::Int64).int64_value(&[]);
            assert!(zero < with_copies.grad().numel() as i64 / 100, "{zero} gradient entries are zero");
            // An optimizer-like change of the f32 weights must reach the copies.
            for m in [&with_copies, &converting] {
                tch::no_grad(|| {
                    let _ = m.flat().shallow_clone().g_mul_scalar_(0.9);
                });
            }
            // Copies rebuilt between backwards (the trainer sets the kind once, a caller may again)
            // must still deliver their gradients.
            with_copies.set_compute(Kind::BFloat16);
        }
    }
}

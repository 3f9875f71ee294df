//! A named store of tensors that model code takes its parameters from, by
//! checkpoint key (`down_blocks.0.resnets.1.conv1.weight`). Module builders
//! walk the key tree with [`Weights::pp`] and ask for each tensor with its
//! expected shape, so a wrong file fails with the key that does not fit.
//! Keys that were never asked for can be listed afterwards (unexpected keys).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("the checkpoint has no tensor `{key}` (needed by the {component})")]
    Missing { component: String, key: String },
    #[error("tensor `{key}` of the {component} has shape {found:?}, the model config expects {expected:?}")]
    Shape { component: String, key: String, expected: Vec<i64>, found: Vec<i64> },
}

struct Store {
    component: String,
    tensors: HashMap<String, Tensor>,
    used: BTreeSet<String>,
    /// Every tensor handed to a module, after conversion: the model's parameters by key.
    taken: Vec<(String, Tensor)>,
    device: Device,
    kind: Kind,
    /// `Some(seed)`: a generating store (see [`Weights::random`]).
    random_seed: Option<u64>,
}

/// A view into a weight store under a key prefix.
#[derive(Clone)]
pub struct Weights {
    store: Rc<RefCell<Store>>,
    prefix: String,
}

impl Weights {
    /// `component` names the model part in error messages ("UNet", "VAE", "text encoder").
    /// Floating-point tensors are converted to `kind` and moved to `device` as they are taken.
    pub fn new(component: &str, tensors: HashMap<String, Tensor>, device: Device, kind: Kind) -> Self {
        Weights {
            store: Rc::new(RefCell::new(Store {
                component: component.to_string(),
                tensors,
                used: BTreeSet::new(),
                taken: Vec::new(),
                device,
                kind,
                random_seed: None,
            })),
            prefix: String::new(),
        }
    }

    /// A store that makes up every tensor a module asks for, with the asked shape:
    /// deterministic random weights for the built-in demo model, without a second
    /// list of keys and shapes to keep in step with the model code. Matrices and
    /// kernels are normal with std 1/sqrt(fan_in), 1-D `weight`s (norm scales) are
    /// ones, biases zeros. Each tensor depends only on `seed` and its key, not on
    /// the order modules ask. [`parameters`](Self::parameters) then gives them all.
    pub fn random(component: &str, seed: u64, device: Device, kind: Kind) -> Self {
        let w = Weights::new(component, HashMap::new(), device, kind);
        w.store.borrow_mut().random_seed = Some(seed);
        w
    }

    /// Sub-path: `w.pp("down_blocks").pp(0)` looks under `down_blocks.0.`.
    pub fn pp(&self, name: impl ToString) -> Weights {
        let name = name.to_string();
        let prefix = if self.prefix.is_empty() { name } else { format!("{}.{}", self.prefix, name) };
        Weights { store: self.store.clone(), prefix }
    }

    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) }
    }

    pub fn device(&self) -> Device {
        self.store.borrow().device
    }

    pub fn kind(&self) -> Kind {
        self.store.borrow().kind
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.borrow().tensors.contains_key(&self.key(name))
    }

    /// True when any key starts with this view's prefix followed by `name.`.
    pub fn contains_prefix(&self, name: &str) -> bool {
        let p = format!("{}.", self.key(name));
        self.store.borrow().tensors.keys().any(|k| k.starts_with(&p))
    }

    /// Takes the tensor `name` under this prefix; checks its shape.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, WeightError> {
        let key = self.key(name);
        let mut store = self.store.borrow_mut();
        let t = match (store.tensors.get(&key), store.random_seed) {
            (Some(t), _) => t.shallow_clone(),
            (None, Some(seed)) => {
                let t = made_up_tensor(&key, shape, seed);
                store.tensors.insert(key.clone(), t.shallow_clone());
                t
            }
            (None, None) => {
                return Err(WeightError::Missing { component: store.component.clone(), key });
            }
        };
        if t.size() != shape {
            return Err(WeightError::Shape {
                component: store.component.clone(),
                key,
                expected: shape.to_vec(),
                found: t.size(),
            });
        }
        let t = if t.is_floating_point() { t.to_device(store.device).to_kind(store.kind) } else { t.to_device(store.device) };
        store.used.insert(key.clone());
        store.taken.push((key, t.shallow_clone()));
        Ok(t)
    }

    /// Like [`get`](Self::get) but with the shape read from the tensor itself
    /// (for tensors whose size the config does not fix).
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor, WeightError> {
        let shape = {
            let store = self.store.borrow();
            match store.tensors.get(&self.key(name)) {
                Some(t) => t.size(),
                None => {
                    return Err(WeightError::Missing { component: store.component.clone(), key: self.key(name) })
                }
            }
        };
        self.get(name, &shape)
    }

    /// Keys of the store that no module took.
    pub fn unused_keys(&self) -> Vec<String> {
        let store = self.store.borrow();
        let mut v: Vec<String> = store.tensors.keys().filter(|k| !store.used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// The tensors modules took, by checkpoint key: what training updates and saves.
    /// They are the same tensors the modules hold (shared storage and autograd state).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.store.borrow().taken.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
    }

    /// Drops the store's own references to the tensors (modules keep theirs),
    /// so memory is not held twice once a model is built.
    pub fn release(&self) {
        self.store.borrow_mut().tensors.clear();
    }
}

/// The tensor a generating store hands out for `key` (see [`Weights::random`]).
fn made_up_tensor(key: &str, shape: &[i64], seed: u64) -> Tensor {
    let name = key.rsplit('.').next().unwrap_or(key);
    if shape.len() == 1 {
        let fill = if name == "weight" { 1.0 } else { 0.0 };
        return Tensor::full(shape, fill, (Kind::Float, Device::Cpu));
    }
    let fan_in: i64 = shape[1..].iter().product::<i64>().max(1);
    let std = 1.0 / (fan_in as f64).sqrt();
    let count: i64 = shape.iter().product();
    // FNV-1a of the key, mixed with the seed: one independent stream per tensor.
    let mut state = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    state ^= seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut uniform = move || {
        // splitmix64, mapped to (0, 1)
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = (0..count)
        .map(|_| {
            // Box-Muller; one normal per pair of uniforms keeps it simple.
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Tensor::from_slice(&values).reshape(shape)
}

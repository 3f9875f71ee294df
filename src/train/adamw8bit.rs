//! Blockwise 8-bit AdamW (bitsandbytes-style dynamic quantisation of both moments).
//!
//! As bitsandbytes' `AdamW8bit`: each moment of a parameter with at least
//! `MIN_8BIT_NUMEL` elements is stored as one `uint8` code per element plus one
//! fp32 absmax per block of `BLOCK_SIZE` elements. A code indexes the dynamic
//! quantisation map (signed for the first moment, unsigned for the second);
//! value = map[code] × absmax of its block. Smaller tensors keep fp32 moments,
//! as bitsandbytes does, since the scales would cost more than they save.
//!
//! One step per parameter: dequantise → AdamW update in fp32 → new per-block
//! absmax → requantise to the nearest code. The update follows the
//! bitsandbytes kernel: `p += -lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε·√(1−β₂ᵗ))`,
//! then the decoupled weight decay `p *= 1 − lr·wd` (after the update, where
//! PyTorch's AdamW decays before it; the two differ by O(lr²·wd)).

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::adamw::AdamWConfig;

/// Elements per absmax block (bitsandbytes' `BLOCKSIZE_2STATE`).
pub const BLOCK_SIZE: i64 = 256;
/// Parameters with fewer elements keep fp32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_NUMEL: i64 = 4096;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`:
/// for each decade 10^(i−6), i = 0..6, the midpoints of an even split of
/// [0.1, 1] (2^i pieces signed, both signs; 2^(i+1) unsigned), plus 0 and 1,
/// sorted. Computed with the same float32 torch ops (linspace, mean of
/// neighbours, scalar multiply) so the values are bit-identical.
pub fn create_dynamic_map(signed: bool) -> Vec<f32> {
    const MAX_EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let pieces = if signed { 1i64 << i } else { 1i64 << (i + 1) };
        debug_assert_eq!(NON_SIGN_BITS, MAX_EXPONENT_BITS);
        let boundaries = Tensor::linspace(0.1, 1.0, pieces + 1, (Kind::Float, Device::Cpu));
        let means = (boundaries.narrow(0, 0, pieces) + boundaries.narrow(0, 1, pieces)) / 2.0;
        // Python's `10 ** (i - 6)` is a libm pow for negative exponents.
        let scale = 10f64.powf((i - (MAX_EXPONENT_BITS - 1)) as f64);
        let positive = Vec::<f32>::try_from(&(&means * scale)).expect("a float tensor");
        data.extend_from_slice(&positive);
        if signed {
            let negative = Vec::<f32>::try_from(&(&means * -scale)).expect("a float tensor");
            data.extend_from_slice(&negative);
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.partial_cmp(b).expect("the map has no NaN"));
    data
}

/// A quantisation map on one device, with the midpoints between neighbouring
/// codes so that "nearest code" is one `bucketize` (O(N log 256)).
pub struct QuantMap {
    pub signed: bool,
    /// The 256 code values, ascending.
    pub values: Tensor,
    /// The 255 midpoints between neighbouring values.
    midpoints: Tensor,
    /// The code of 0.0 in a signed map (negative values round to it or below).
    zero_code: Option<i64>,
}

impl QuantMap {
    pub fn new(signed: bool, device: Device) -> QuantMap {
        let map = create_dynamic_map(signed);
        let zero_code = if signed { map.iter().position(|&v| v == 0.0).map(|i| i as i64) } else { None };
        let values = Tensor::from_slice(&map).to_device(device);
        let midpoints = (values.narrow(0, 0, 255) + values.narrow(0, 1, 255)) / 2.0;
        QuantMap { signed, values, midpoints, zero_code }
    }

    /// Codes of the nearest map values to `normalized` (values in [−1, 1]).
    pub fn nearest_codes(&self, normalized: &Tensor) -> Tensor {
        normalized.bucketize(&self.midpoints, false, false)
    }
}

/// Blockwise quantisation of a float tensor: (codes as uint8 with the tensor's
/// element count, flat; absmax per block as fp32).
pub fn quantize_blockwise(x: &Tensor, map: &QuantMap) -> (Tensor, Tensor) {
    let x = x.to_kind(Kind::Float).reshape([-1]);
    let numel = x.size()[0];
    let blocks = as_blocks(&x);
    let absmax = blocks.abs().amax([1], false);
    let codes = codes_for(&blocks, &absmax, map).reshape([-1]).narrow(0, 0, numel);
    (codes.to_kind(Kind::Uint8), absmax)
}

/// Inverse of `quantize_blockwise`: flat fp32 values (reshape to the parameter's shape).
pub fn dequantize_blockwise(codes: &Tensor, absmax: &Tensor, map: &QuantMap) -> Tensor {
    let numel = codes.size()[0];
    let values = map.values.take(&codes.to_kind(Kind::Int64));
    (as_blocks(&values) * absmax.unsqueeze(1)).reshape([-1]).narrow(0, 0, numel)
}

/// Number of absmax blocks for `numel` elements.
pub fn block_count(numel: i64) -> i64 {
    (numel + BLOCK_SIZE - 1) / BLOCK_SIZE
}

/// Pads a flat tensor with zeros to whole blocks and views it as (blocks, BLOCK_SIZE).
fn as_blocks(flat: &Tensor) -> Tensor {
    let numel = flat.size()[0];
    let padded = block_count(numel) * BLOCK_SIZE;
    flat.constant_pad_nd([0, padded - numel]).reshape([-1, BLOCK_SIZE])
}

/// Nearest codes of `blocks / absmax` (an all-zero block quantises to zero).
fn codes_for(blocks: &Tensor, absmax: &Tensor, map: &QuantMap) -> Tensor {
    let safe = absmax.where_scalarother(&absmax.gt(0.0), 1.0).unsqueeze(1);
    let normalized = blocks / safe;
    let mut codes = map.nearest_codes(&normalized);
    if let Some(zero) = map.zero_code {
        // As bitsandbytes: a first moment never changes sign by quantisation.
        // With this map only a negative value (or -0.0) rounding to the zero
        // code can: it takes the next code down, the smallest negative value.
        let flipped = codes.eq(zero).logical_and(&normalized.signbit());
        codes -= flipped.to_kind(Kind::Int64);
    }
    codes
}

/// One parameter's moments.
enum Moments {
    /// Full-precision moments, for small tensors.
    Fp32 { exp_avg: Tensor, exp_avg_sq: Tensor },
    /// Flat uint8 codes and per-block fp32 absmax.
    Quantized { exp_avg: Tensor, exp_avg_absmax: Tensor, exp_avg_sq: Tensor, exp_avg_sq_absmax: Tensor },
}

impl Moments {
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Moments::Fp32 { exp_avg, exp_avg_sq } => vec![exp_avg, exp_avg_sq],
            Moments::Quantized { exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax } => {
                vec![exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax]
            }
        }
    }
}

/// The maps for one device (parameters may live on more than one).
struct DeviceMaps {
    device: Device,
    signed: QuantMap,
    unsigned: QuantMap,
}

pub struct AdamW8bit {
    pub config: AdamWConfig,
    /// Parameters by checkpoint key, in a fixed order.
    params: Vec<(String, Tensor)>,
    moments: HashMap<String, Moments>,
    maps: Vec<DeviceMaps>,
    /// Optimizer steps taken.
    pub step: u64,
}

/// Checkpoint names of the state tensors (the quantised and fp32 forms differ,
/// so a state file says which one it holds).
const FP32_KEYS: [&str; 2] = ["exp_avg", "exp_avg_sq"];
const QUANTIZED_KEYS: [&str; 4] = ["exp_avg_q8", "exp_avg_absmax", "exp_avg_sq_q8", "exp_avg_sq_absmax"];

impl AdamW8bit {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> AdamW8bit {
        AdamW8bit { config, params, moments: HashMap::new(), maps: Vec::new(), step: 0 }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Whether a parameter of this many elements gets 8-bit moments.
    pub fn is_quantized(numel: i64) -> bool {
        numel >= MIN_8BIT_NUMEL
    }

    /// Bytes of optimizer state a parameter of `numel` elements will hold.
    pub fn state_bytes_for(numel: i64) -> u64 {
        let numel = numel as u64;
        if Self::is_quantized(numel as i64) {
            2 * numel + 2 * 4 * block_count(numel as i64) as u64
        } else {
            2 * 4 * numel
        }
    }

    /// Bytes of the state tensors held now (none before the first step).
    pub fn state_bytes(&self) -> u64 {
        self.moments
            .values()
            .flat_map(|m| m.tensors())
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    }

    fn maps_index(&mut self, device: Device) -> usize {
        if let Some(i) = self.maps.iter().position(|m| m.device == device) {
            return i;
        }
        self.maps.push(DeviceMaps { device, signed: QuantMap::new(true, device), unsigned: QuantMap::new(false, device) });
        self.maps.len() - 1
    }

    /// One update with learning rate `lr` from the parameters' current `.grad()`.
    /// Parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let step = self.step as i32;
        let correction1 = 1.0 - c.beta1.powi(step);
        let correction2 = (1.0 - c.beta2.powi(step)).sqrt();
        let step_size = -lr * correction2 / correction1;
        let params: Vec<(String, Tensor)> = self.params.iter().map(|(k, p)| (k.clone(), p.shallow_clone())).collect();
        for (key, param) in params {
            let grad = param.grad();
            if !grad.defined() {
                continue;
            }
            let grad = grad.to_kind(Kind::Float).reshape([-1]);
            let numel = grad.size()[0];
            let maps = self.maps_index(param.device());
            let moments = self.moments.entry(key).or_insert_with(|| {
                let zeros = || Tensor::zeros([numel], (Kind::Float, param.device()));
                if Self::is_quantized(numel) {
                    let codes = |map: &QuantMap| map.nearest_codes(&zeros()).to_kind(Kind::Uint8);
                    let absmax = || Tensor::zeros([block_count(numel)], (Kind::Float, param.device()));
                    let m = &self.maps[maps];
                    Moments::Quantized {
                        exp_avg: codes(&m.signed),
                        exp_avg_absmax: absmax(),
                        exp_avg_sq: codes(&m.unsigned),
                        exp_avg_sq_absmax: absmax(),
                    }
                } else {
                    Moments::Fp32 { exp_avg: zeros(), exp_avg_sq: zeros() }
                }
            });
            let maps = &self.maps[maps];
            let (exp_avg, exp_avg_sq) = match moments {
                Moments::Fp32 { exp_avg, exp_avg_sq } => {
                    update_moments(exp_avg, exp_avg_sq, &grad, c);
                    (exp_avg.shallow_clone(), exp_avg_sq.shallow_clone())
                }
                Moments::Quantized { exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax } => {
                    let mut m = dequantize_blockwise(exp_avg, exp_avg_absmax, &maps.signed);
                    let mut v = dequantize_blockwise(exp_avg_sq, exp_avg_sq_absmax, &maps.unsigned);
                    update_moments(&mut m, &mut v, &grad, c);
                    let (codes, absmax) = quantize_blockwise(&m, &maps.signed);
                    *exp_avg = codes;
                    *exp_avg_absmax = absmax;
                    let (codes, absmax) = quantize_blockwise(&v, &maps.unsigned);
                    *exp_avg_sq = codes;
                    *exp_avg_sq_absmax = absmax;
                    // The update uses the unquantised new moments, as the kernel does.
                    (m, v)
                }
            };
            let update = (&exp_avg / (exp_avg_sq.sqrt() + c.eps * correction2)) * step_size;
            let mut new_param = param.to_kind(Kind::Float).reshape([-1]) + update;
            if c.weight_decay > 0.0 {
                new_param *= 1.0 - lr * c.weight_decay;
            }
            let mut param = param;
            param.copy_(&new_param.reshape(param.size()).to_kind(param.kind()));
        }
    }

    /// Zeroes the gradients (keeping their memory for the next backward pass).
    pub fn zero_grad(&mut self) {
        super::adamw::zero_grads(&self.params);
    }

    /// The state as named tensors (for checkpoint files); the step count is saved apart.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (key, _) in &self.params {
            match self.moments.get(key) {
                Some(m @ Moments::Fp32 { .. }) => {
                    for (name, t) in FP32_KEYS.iter().zip(m.tensors()) {
                        out.push((format!("{name}.{key}"), t.shallow_clone()));
                    }
                }
                Some(m @ Moments::Quantized { .. }) => {
                    for (name, t) in QUANTIZED_KEYS.iter().zip(m.tensors()) {
                        out.push((format!("{name}.{key}"), t.shallow_clone()));
                    }
                }
                None => {}
            }
        }
        out
    }

    /// Restores what `state_tensors` saved (moved to each parameter's device).
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<()> {
        self.step = step;
        self.moments.clear();
        for (key, p) in &self.params {
            let numel = p.numel() as i64;
            let quantized = Self::is_quantized(numel);
            let names: &[&str] = if quantized { &QUANTIZED_KEYS } else { &FP32_KEYS };
            let found: Vec<Option<&Tensor>> = names.iter().map(|n| tensors.get(&format!("{n}.{key}"))).collect();
            if found.iter().all(Option::is_none) {
                if step == 0 {
                    continue;
                }
                let other = if quantized { FP32_KEYS[0] } else { QUANTIZED_KEYS[0] };
                if tensors.contains_key(&format!("{other}.{key}")) {
                    anyhow::bail!(
                        "the optimizer state of `{key}` was saved by the other optimizer (adamw vs adamw_8bit)"
                    );
                }
                anyhow::bail!("the optimizer state has no moments for `{key}`");
            }
            let mut loaded = Vec::new();
            for (name, t) in names.iter().zip(found) {
                let Some(t) = t else {
                    anyhow::bail!("the optimizer state has no `{name}.{key}`");
                };
                loaded.push(t.to_device(p.device()));
            }
            let blocks = block_count(numel);
            let expect = |t: &Tensor, len: i64, kind: Kind| t.size() == [len] && t.kind() == kind;
            let moments = if quantized {
                let ok = expect(&loaded[0], numel, Kind::Uint8)
                    && expect(&loaded[1], blocks, Kind::Float)
                    && expect(&loaded[2], numel, Kind::Uint8)
                    && expect(&loaded[3], blocks, Kind::Float);
                if !ok {
                    anyhow::bail!("the 8-bit optimizer state of `{key}` does not match the parameter's size");
                }
                let mut it = loaded.into_iter();
                Moments::Quantized {
                    exp_avg: it.next().unwrap(),
                    exp_avg_absmax: it.next().unwrap(),
                    exp_avg_sq: it.next().unwrap(),
                    exp_avg_sq_absmax: it.next().unwrap(),
                }
            } else {
                if !loaded.iter().all(|t| expect(t, numel, Kind::Float)) {
                    anyhow::bail!("the optimizer state of `{key}` does not match the parameter's size");
                }
                let mut it = loaded.into_iter();
                Moments::Fp32 { exp_avg: it.next().unwrap(), exp_avg_sq: it.next().unwrap() }
            };
            self.moments.insert(key.clone(), moments);
        }
        Ok(())
    }
}

/// m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², in place (fp32, flat).
fn update_moments(m: &mut Tensor, v: &mut Tensor, grad: &Tensor, c: AdamWConfig) {
    let _ = m.g_mul_scalar_(c.beta1);
    let _ = m.g_add_(&(grad * (1.0 - c.beta1)));
    let _ = v.g_mul_scalar_(c.beta2);
    let _ = v.g_add_(&((grad * (1.0 - c.beta2)) * grad));
}

//! Blockwise 8-bit AdamW (bitsandbytes-style dynamic quantisation of both moments).
//!
//! As bitsandbytes' `AdamW8bit`: each moment of a parameter with at least
//! `MIN_8BIT_NUMEL` elements is stored as one `uint8` code per element plus one
//! fp32 absmax per block of `BLOCK_SIZE` elements. A code indexes the dynamic
//! quantisation map (signed for the first moment, unsigned for the second);
//! value = map[code] × absmax of its block. Smaller tensors keep fp32 moments,
//! as bitsandbytes does, since the scales would cost more than they save.
//!
//! One step per group of parameters (see `GROUP_NUMEL`): dequantise → AdamW
//! update in fp32 → new per-block absmax → requantise to the nearest code, on
//! flat buffers where each parameter starts at a block boundary, so the numbers
//! are those of a per-parameter update, bit for bit. The update follows the
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
        // int32 codes: half the transient memory of int64 on a whole group.
        normalized.bucketize(&self.midpoints, true, false)
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
    let values = map.values.index_select(0, &codes.to_kind(Kind::Int));
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
    let flat = if padded == numel { flat.shallow_clone() } else { flat.constant_pad_nd([0, padded - numel]) };
    flat.reshape([-1, BLOCK_SIZE])
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
        codes -= flipped.to_kind(Kind::Int);
    }
    codes
}

/// Elements per group: the flat buffers one update runs on. On CUDA a
/// per-parameter update launches ~30 kernels for each of an SD UNet's ~700
/// tensors, and the step is launch-bound; grouped, it is ~30 per group. A larger
/// group launches fewer kernels and needs more transient memory (~6 fp32 copies
/// of a group during its update: 400 MB at this size, about what the largest
/// SD 1.5 tensor alone needed per parameter). On the CPU launches cost little
/// and a flat buffer larger than the caches makes every one of those passes go
/// to memory (measured 2× slower): there each parameter is its own group.
pub const GROUP_NUMEL: i64 = 1 << 24;

/// A group's moments (or views of one member's part of them).
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

/// One parameter's place in its group's flat buffers.
struct Member {
    /// Index into `AdamW8bit::params`.
    param: usize,
    /// First element in the flat buffers (a whole block for quantised groups, so
    /// every parameter's blocks are its own, as bitsandbytes quantises per tensor).
    offset: i64,
    numel: i64,
}

/// Parameters updated together: same device, dtype, state kind and learning rate.
struct Group {
    quantized: bool,
    /// The group's learning rate over the scheduled one.
    lr_scale: f64,
    device: Device,
    kind: Kind,
    members: Vec<Member>,
    /// Elements of the flat buffers (whole blocks when quantised).
    len: i64,
    /// Allocated at the first step (or when a saved state is loaded).
    moments: Option<Moments>,
}

impl Group {
    fn zeros(&self, maps: &DeviceMaps) -> Moments {
        let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, self.device));
        if self.quantized {
            let codes = |map: &QuantMap| map.nearest_codes(&zeros(self.len)).to_kind(Kind::Uint8);
            let blocks = self.len / BLOCK_SIZE;
            Moments::Quantized {
                exp_avg: codes(&maps.signed),
                exp_avg_absmax: zeros(blocks),
                exp_avg_sq: codes(&maps.unsigned),
                exp_avg_sq_absmax: zeros(blocks),
            }
        } else {
            Moments::Fp32 { exp_avg: zeros(self.len), exp_avg_sq: zeros(self.len) }
        }
    }

    /// Views of `member`'s part of the moments.
    fn member_moments(&self, member: &Member) -> Moments {
        let moments = self.moments.as_ref().expect("moments are allocated before use");
        let span = |t: &Tensor| t.narrow(0, member.offset, member.numel);
        let blocks = |t: &Tensor| t.narrow(0, member.offset / BLOCK_SIZE, block_count(member.numel));
        match moments {
            Moments::Fp32 { exp_avg, exp_avg_sq } => Moments::Fp32 { exp_avg: span(exp_avg), exp_avg_sq: span(exp_avg_sq) },
            Moments::Quantized { exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax } => Moments::Quantized {
                exp_avg: span(exp_avg),
                exp_avg_absmax: blocks(exp_avg_absmax),
                exp_avg_sq: span(exp_avg_sq),
                exp_avg_sq_absmax: blocks(exp_avg_sq_absmax),
            },
        }
    }

    fn whole_moments(&self) -> Moments {
        let moments = self.moments.as_ref().expect("moments are allocated before use");
        let t: Vec<Tensor> = moments.tensors().into_iter().map(Tensor::shallow_clone).collect();
        match moments {
            Moments::Fp32 { .. } => Moments::Fp32 { exp_avg: t[0].shallow_clone(), exp_avg_sq: t[1].shallow_clone() },
            Moments::Quantized { .. } => Moments::Quantized {
                exp_avg: t[0].shallow_clone(),
                exp_avg_absmax: t[1].shallow_clone(),
                exp_avg_sq: t[2].shallow_clone(),
                exp_avg_sq_absmax: t[3].shallow_clone(),
            },
        }
    }
}

/// The maps for one device (parameters may live on more than one).
struct DeviceMaps {
    device: Device,
    signed: QuantMap,
    unsigned: QuantMap,
}

/// The step's scalars.
#[derive(Clone, Copy)]
struct StepScalars {
    config: AdamWConfig,
    lr: f64,
    correction2: f64,
    step_size: f64,
}

pub struct AdamW8bit {
    pub config: AdamWConfig,
    /// Parameters by checkpoint key, in a fixed order.
    params: Vec<(String, Tensor)>,
    /// Formed at the first use, when the parameters are on their final device.
    groups: Vec<Group>,
    /// Each parameter's (group, member) in `groups`.
    member_of: Vec<(usize, usize)>,
    /// Set by `with_group_numel`; else by device (see `GROUP_NUMEL`).
    group_numel: Option<i64>,
    /// Whether each parameter has moments of its own yet (it had a gradient at a
    /// step, or its state was loaded): only those are saved.
    has_state: Vec<bool>,
    maps: Vec<DeviceMaps>,
    /// Each parameter's learning rate over the scheduled one; 1 unless set.
    lr_scales: Vec<f64>,
    /// Optimizer steps taken.
    pub step: u64,
}

/// Checkpoint names of the state tensors (the quantised and fp32 forms differ,
/// so a state file says which one it holds).
const FP32_KEYS: [&str; 2] = ["exp_avg", "exp_avg_sq"];
const QUANTIZED_KEYS: [&str; 4] = ["exp_avg_q8", "exp_avg_absmax", "exp_avg_sq_q8", "exp_avg_sq_absmax"];

impl AdamW8bit {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> AdamW8bit {
        let has_state = vec![false; params.len()];
        let lr_scales = vec![1.0; params.len()];
        AdamW8bit { config, params, groups: Vec::new(), member_of: Vec::new(), group_numel: None, has_state, maps: Vec::new(), lr_scales, step: 0 }
    }

    /// The same optimizer with parameter `i` stepping at `scales[i]` × the step's learning rate.
    pub fn with_lr_scales(mut self, scales: Vec<f64>) -> AdamW8bit {
        assert!(self.groups.is_empty(), "groups are fixed at the first step");
        assert_eq!(scales.len(), self.params.len(), "one learning-rate scale per parameter");
        self.lr_scales = scales;
        self
    }

    /// The same optimizer with groups of at most `numel` elements (1: one group
    /// per parameter). The update does not depend on it: the tests compare.
    pub fn with_group_numel(mut self, numel: i64) -> AdamW8bit {
        assert!(self.groups.is_empty(), "groups are fixed at the first step");
        self.group_numel = Some(numel.max(1));
        self
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Whether a parameter of this many elements gets 8-bit moments.
    pub fn is_quantized(numel: i64) -> bool {
        numel >= MIN_8BIT_NUMEL
    }

    /// Bytes of optimizer state a parameter of `numel` elements will hold (its
    /// codes fill whole blocks).
    pub fn state_bytes_for(numel: i64) -> u64 {
        if Self::is_quantized(numel) {
            let blocks = block_count(numel) as u64;
            2 * BLOCK_SIZE as u64 * blocks + 2 * 4 * blocks
        } else {
            2 * 4 * numel as u64
        }
    }

    /// Bytes of the state tensors held now (none before the first step).
    pub fn state_bytes(&self) -> u64 {
        self.groups
            .iter()
            .filter_map(|g| g.moments.as_ref())
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

    fn maps_for(&self, device: Device) -> &DeviceMaps {
        self.maps.iter().find(|m| m.device == device).expect("maps are made with the groups")
    }

    /// Packs the parameters, in order, into groups of one device, dtype and
    /// state kind, each at most `group_numel` elements (a larger tensor alone).
    fn ensure_groups(&mut self) {
        if !self.groups.is_empty() || self.params.is_empty() {
            return;
        }
        let mut open: HashMap<(Device, Kind, bool, u64), usize> = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        for (index, ((_, p), &lr_scale)) in self.params.iter().zip(&self.lr_scales).enumerate() {
            let numel = p.numel() as i64;
            let quantized = Self::is_quantized(numel);
            let key = (p.device(), p.kind(), quantized, lr_scale.to_bits());
            let span = if quantized { block_count(numel) * BLOCK_SIZE } else { numel };
            let limit = self.group_numel.unwrap_or(if key.0.is_cuda() { GROUP_NUMEL } else { 1 });
            let fits = open.get(&key).is_some_and(|&g| groups[g].len + span <= limit);
            if !fits {
                open.insert(key, groups.len());
                groups.push(Group { quantized, lr_scale, device: key.0, kind: key.1, members: Vec::new(), len: 0, moments: None });
            }
            let group = &mut groups[open[&key]];
            group.members.push(Member { param: index, offset: group.len, numel });
            group.len += span;
        }
        for g in &groups {
            self.maps_index(g.device);
        }
        let mut member_of = vec![(0, 0); self.params.len()];
        for (g, group) in groups.iter().enumerate() {
            for (m, member) in group.members.iter().enumerate() {
                member_of[member.param] = (g, m);
            }
        }
        self.member_of = member_of;
        self.groups = groups;
    }

    fn ensure_moments(&mut self, group: usize) {
        if self.groups[group].moments.is_none() {
            let zeros = self.groups[group].zeros(self.maps_for(self.groups[group].device));
            self.groups[group].moments = Some(zeros);
        }
    }

    /// One update with learning rate `lr` from the parameters' current `.grad()`.
    /// Parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.ensure_groups();
        self.step += 1;
        let c = self.config;
        let step = self.step as i32;
        let correction1 = 1.0 - c.beta1.powi(step);
        let correction2 = (1.0 - c.beta2.powi(step)).sqrt();
        for g in 0..self.groups.len() {
            let lr = lr * self.groups[g].lr_scale;
            let scalars = StepScalars { config: c, lr, correction2, step_size: -lr * correction2 / correction1 };
            let grads: Vec<Tensor> = self.groups[g].members.iter().map(|m| self.params[m.param].1.grad()).collect();
            let with_grad = grads.iter().filter(|t| t.defined()).count();
            if with_grad == 0 {
                continue;
            }
            self.ensure_moments(g);
            for (m, grad) in self.groups[g].members.iter().zip(&grads) {
                if grad.defined() {
                    self.has_state[m.param] = true;
                }
            }
            if with_grad == grads.len() {
                self.step_group(g, &grads, scalars);
            } else {
                self.step_members(g, &grads, scalars);
            }
        }
    }

    /// Starts an optimizer step whose parameters are then updated one by one
    /// with [`update_param`](Self::update_param) (`training.fused_backward`).
    pub fn begin_step(&mut self) {
        self.ensure_groups();
        self.step += 1;
    }

    /// Updates parameter `i` from its current `.grad()` as [`step`](Self::step)
    /// would in this step (none: left alone); the group's other members' moments
    /// are untouched.
    pub fn update_param(&mut self, i: usize, lr: f64) {
        let _guard = tch::no_grad_guard();
        if !self.params[i].1.grad().defined() {
            return;
        }
        let (g, m) = self.member_of[i];
        let c = self.config;
        let step = self.step as i32;
        let correction1 = 1.0 - c.beta1.powi(step);
        let correction2 = (1.0 - c.beta2.powi(step)).sqrt();
        let lr = lr * self.groups[g].lr_scale;
        let scalars = StepScalars { config: c, lr, correction2, step_size: -lr * correction2 / correction1 };
        self.ensure_moments(g);
        self.has_state[i] = true;
        let group = &self.groups[g];
        let member = &group.members[m];
        let mut param = self.params[i].1.shallow_clone();
        let mut moments = group.member_moments(member);
        let grad = param.grad().to_kind(Kind::Float).reshape([-1]);
        let flat = param.to_kind(Kind::Float).reshape([-1]);
        let updated = update_span(&mut moments, &grad, &flat, self.maps_for(group.device), scalars);
        param.copy_(&updated.reshape(param.size()).to_kind(param.kind()));
    }

    /// The whole group at once: gradients and parameters gathered into flat
    /// buffers (one `cat` each), one update, one multi-tensor copy back.
    fn step_group(&self, g: usize, grads: &[Tensor], s: StepScalars) {
        let group = &self.groups[g];
        let pad = Tensor::zeros([BLOCK_SIZE], (group.kind, group.device));
        // Each member's values, then zeros to its next block boundary.
        let flat = |values: Vec<Tensor>| -> Tensor {
            let mut parts = Vec::with_capacity(2 * values.len());
            for (m, t) in group.members.iter().zip(values) {
                parts.push(t.reshape([-1]));
                let rest = if group.quantized { block_count(m.numel) * BLOCK_SIZE - m.numel } else { 0 };
                if rest > 0 {
                    parts.push(pad.narrow(0, 0, rest));
                }
            }
            Tensor::cat(&parts, 0).to_kind(Kind::Float)
        };
        let grad = flat(grads.iter().map(|t| t.to_kind(group.kind)).collect());
        let targets: Vec<Tensor> = group.members.iter().map(|m| self.params[m.param].1.shallow_clone()).collect();
        let param = flat(targets.iter().map(Tensor::shallow_clone).collect());
        let mut moments = group.whole_moments();
        let updated = update_span(&mut moments, &grad, &param, self.maps_for(group.device), s).to_kind(group.kind);
        let sources: Vec<Tensor> = group
            .members
            .iter()
            .map(|m| updated.narrow(0, m.offset, m.numel).view(self.params[m.param].1.size().as_slice()))
            .collect();
        super::foreach::copy(&targets, &sources).expect("copying the updated parameters back");
    }

    /// Member by member, for a group where only some parameters have gradients.
    fn step_members(&self, g: usize, grads: &[Tensor], s: StepScalars) {
        let group = &self.groups[g];
        for (m, grad) in group.members.iter().zip(grads) {
            if !grad.defined() {
                continue;
            }
            let mut param = self.params[m.param].1.shallow_clone();
            let mut moments = group.member_moments(m);
            let grad = grad.to_kind(Kind::Float).reshape([-1]);
            let flat = param.to_kind(Kind::Float).reshape([-1]);
            let updated = update_span(&mut moments, &grad, &flat, self.maps_for(group.device), s);
            param.copy_(&updated.reshape(param.size()).to_kind(param.kind()));
        }
    }

    /// Zeroes the gradients (keeping their memory for the next backward pass).
    pub fn zero_grad(&mut self) {
        super::adamw::zero_grads(&self.params);
    }

    /// The state as named tensors (for checkpoint files), per parameter; the step
    /// count is saved apart.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut by_param: Vec<Option<Moments>> = (0..self.params.len()).map(|_| None).collect();
        for g in self.groups.iter().filter(|g| g.moments.is_some()) {
            for m in &g.members {
                if self.has_state[m.param] {
                    by_param[m.param] = Some(g.member_moments(m));
                }
            }
        }
        let mut out = Vec::new();
        for ((key, _), moments) in self.params.iter().zip(by_param) {
            let Some(moments) = moments else { continue };
            let names: &[&str] = if matches!(moments, Moments::Fp32 { .. }) { &FP32_KEYS } else { &QUANTIZED_KEYS };
            for (name, t) in names.iter().zip(moments.tensors()) {
                out.push((format!("{name}.{key}"), t.shallow_clone()));
            }
        }
        out
    }

    /// Restores what `state_tensors` saved (moved to each parameter's device).
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        self.ensure_groups();
        // Check everything before changing anything.
        let mut loaded: Vec<Option<Vec<&Tensor>>> = Vec::with_capacity(self.params.len());
        for (key, p) in &self.params {
            let numel = p.numel() as i64;
            let quantized = Self::is_quantized(numel);
            let names: &[&str] = if quantized { &QUANTIZED_KEYS } else { &FP32_KEYS };
            let found: Vec<Option<&Tensor>> = names.iter().map(|n| tensors.get(&format!("{n}.{key}"))).collect();
            if found.iter().all(Option::is_none) {
                let other = if quantized { FP32_KEYS[0] } else { QUANTIZED_KEYS[0] };
                if tensors.contains_key(&format!("{other}.{key}")) {
                    anyhow::bail!(
                        "the optimizer state of `{key}` was saved by the other optimizer (adamw vs adamw_8bit)"
                    );
                }
                // A parameter that never had a gradient has no moments (the text encoder's
                // last layer under clip_skip 2, which the conditioning skips).
                loaded.push(None);
                continue;
            }
            let mut ts = Vec::new();
            for (name, t) in names.iter().zip(found) {
                let Some(t) = t else {
                    anyhow::bail!("the optimizer state has no `{name}.{key}`");
                };
                ts.push(t);
            }
            let blocks = block_count(numel);
            let expect = |t: &Tensor, len: i64, kind: Kind| t.size() == [len] && t.kind() == kind;
            let ok = if quantized {
                expect(ts[0], numel, Kind::Uint8)
                    && expect(ts[1], blocks, Kind::Float)
                    && expect(ts[2], numel, Kind::Uint8)
                    && expect(ts[3], blocks, Kind::Float)
            } else {
                ts.iter().all(|t| expect(t, numel, Kind::Float))
            };
            if !ok {
                let what = if quantized { "the 8-bit optimizer state" } else { "the optimizer state" };
                anyhow::bail!("{what} of `{key}` does not match the parameter's size");
            }
            loaded.push(Some(ts));
        }
        if step > 0 && !self.params.is_empty() && loaded.iter().all(Option::is_none) {
            anyhow::bail!("the optimizer state has no moments at all, after {step} steps");
        }
        self.step = step;
        self.has_state = loaded.iter().map(Option::is_some).collect();
        for g in 0..self.groups.len() {
            let zeros = self.groups[g].zeros(self.maps_for(self.groups[g].device));
            self.groups[g].moments = Some(zeros);
            for m in &self.groups[g].members {
                if let Some(ts) = &loaded[m.param] {
                    let views = self.groups[g].member_moments(m);
                    for (mut view, t) in views.tensors().into_iter().map(Tensor::shallow_clone).zip(ts) {
                        view.copy_(t);
                    }
                }
            }
        }
        Ok(())
    }
}

/// One 8-bit AdamW update of a flat span (a group, or one member of it):
/// `grad` and `param` are its fp32 values; the moments (views) are updated in
/// place; returns the new parameter values.
fn update_span(moments: &mut Moments, grad: &Tensor, param: &Tensor, maps: &DeviceMaps, s: StepScalars) -> Tensor {
    let c = s.config;
    let (exp_avg, exp_avg_sq) = match moments {
        Moments::Fp32 { exp_avg, exp_avg_sq } => {
            update_moments(exp_avg, exp_avg_sq, grad, c);
            (exp_avg.shallow_clone(), exp_avg_sq.shallow_clone())
        }
        Moments::Quantized { exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax } => {
            let mut m = dequantize_blockwise(exp_avg, exp_avg_absmax, &maps.signed);
            let mut v = dequantize_blockwise(exp_avg_sq, exp_avg_sq_absmax, &maps.unsigned);
            update_moments(&mut m, &mut v, grad, c);
            for (value, map, codes_view, absmax_view) in
                [(&m, &maps.signed, exp_avg, exp_avg_absmax), (&v, &maps.unsigned, exp_avg_sq, exp_avg_sq_absmax)]
            {
                let (codes, absmax) = quantize_blockwise(value, map);
                codes_view.copy_(&codes);
                absmax_view.copy_(&absmax);
            }
            // The update uses the unquantised new moments, as the kernel does.
            (m, v)
        }
    };
    let update = (&exp_avg / (exp_avg_sq.sqrt() + c.eps * s.correction2)) * s.step_size;
    let mut new_param = param + update;
    if c.weight_decay > 0.0 {
        new_param *= 1.0 - s.lr * c.weight_decay;
    }
    new_param
}

/// m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², in place (fp32, flat).
fn update_moments(m: &mut Tensor, v: &mut Tensor, grad: &Tensor, c: AdamWConfig) {
    let _ = m.g_mul_scalar_(c.beta1);
    let _ = m.g_add_(&(grad * (1.0 - c.beta1)));
    let _ = v.g_mul_scalar_(c.beta2);
    let _ = v.g_add_(&((grad * (1.0 - c.beta2)) * grad));
}

//! Gradient checkpointing: UNet resnets and transformers and CLIP encoder layers
//! keep only their inputs in the forward pass and recompute their activations in
//! the backward pass, trading one extra forward for the memory of all activations
//! inside each block.
//!
//! Why a custom autograd function (src/shim/checkpoint_shim.cpp) and not
//! segment-wise recompute in Rust: segment-wise recompute needs the training loop
//! to run the backward pass by hand, segment by segment, and the UNet's skip
//! connections make the segments a graph rather than a chain. A node in libtorch's
//! own graph recomputes exactly when the engine reaches it, so the model's forward
//! stays one call, `loss.backward()` stays one call, and any mix of checkpointed and
//! plain blocks works. This is what `torch.utils.checkpoint` does; the parameters a
//! block uses are passed to the node too, so they get their gradients from it even
//! when no input needs one (a frozen base under LoRA).
//!
//! Randomness: the checkpointed blocks draw no random numbers (no dropout in SD's
//! blocks as we build them), so the recomputation is the same computation; no RNG
//! state is saved. Autocast is: the shim restores the forward pass's autocast state
//! for the recomputation.
//!
//! Lifetime: the recomputation calls the block through a pointer, so a model must
//! not be dropped while a graph built by its checkpointed forward is alive (run
//! `backward`, or drop the loss, first). The blocks live in the models' `Vec`s,
//! so moving the model struct itself is fine.

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use super::clip::ClipEncoderLayer;
use super::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use super::resnet::ResnetBlock2D;
use super::unet::{BasicTransformerBlock, CrossAttention, Projection, Transformer2DModel};

type C = torch_sys::C_tensor;
type BlockFn = unsafe extern "C" fn(*mut c_void, *mut *mut C, usize, *mut *mut C, usize, *mut usize, *mut c_char, usize) -> i32;
type DropFn = unsafe extern "C" fn(*mut c_void);

mod ffi {
    use super::*;
    extern "C" {
        pub fn dbt_ckpt_last_error() -> *const c_char;
        pub fn dbt_ckpt_grad_enabled() -> i32;
        pub fn dbt_ckpt_apply(
            block: BlockFn,
            drop: DropFn,
            ctx: *mut c_void,
            args: *const *mut C,
            n_inputs: usize,
            n_params: usize,
            outputs: *mut *mut C,
            max_outputs: usize,
            n_outputs: *mut usize,
        ) -> i32;
    }
}

/// The most tensors a checkpointed block may return (the shim's buffer).
const MAX_OUTPUTS: usize = 16;

type Block = Box<dyn Fn(&[Tensor]) -> Vec<Tensor>>;

thread_local! {
    static BLOCK_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times checkpointed blocks ran on this thread (forward and recompute):
/// lets tests see that recomputation happened.
pub fn block_runs() -> usize {
    BLOCK_RUNS.with(|c| c.get())
}

/// Called by the shim (forward, and again in backward): runs the block on tensors
/// whose handles it hands over, hands back the outputs' handles.
unsafe extern "C" fn run_block(
    ctx: *mut c_void,
    inputs: *mut *mut C,
    n_inputs: usize,
    outputs: *mut *mut C,
    max_outputs: usize,
    n_outputs: *mut usize,
    error: *mut c_char,
    error_len: usize,
) -> i32 {
    let block = &*(ctx as *const Block);
    BLOCK_RUNS.with(|c| c.set(c.get() + 1));
    let inputs: Vec<Tensor> = (0..n_inputs).map(|i| Tensor::from_ptr(*inputs.add(i))).collect();
    let result = catch_unwind(AssertUnwindSafe(|| block(&inputs)));
    let message = match result {
        Ok(outs) if outs.len() <= max_outputs => {
            for (i, mut t) in outs.into_iter().enumerate() {
                *outputs.add(i) = t.as_mut_ptr();
                std::mem::forget(t); // the shim owns the handle now
                *n_outputs = i + 1;
            }
            return 0;
        }
        Ok(outs) => format!("it returned {} tensors, more than {max_outputs}", outs.len()),
        Err(panic) => crate::error::panic_text(panic.as_ref()),
    };
    let bytes = message.as_bytes();
    let n = bytes.len().min(error_len.saturating_sub(1));
    std::ptr::copy_nonoverlapping(bytes.as_ptr() as *const c_char, error, n);
    *error.add(n) = 0;
    1
}

unsafe extern "C" fn drop_block(ctx: *mut c_void) {
    drop(Box::from_raw(ctx as *mut Block));
}

/// Whether autograd records operations on this thread now.
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { ffi::dbt_ckpt_grad_enabled() != 0 }
}

/// Runs `block` on `inputs` without keeping its activations; the backward pass
/// runs it again to get them. `params`: every tensor requiring grad that the block
/// uses besides its inputs (leave one out and it gets no gradient from here).
pub fn checkpoint(inputs: &[&Tensor], params: &[Tensor], block: impl Fn(&[Tensor]) -> Vec<Tensor> + 'static) -> Vec<Tensor> {
    let block: Block = Box::new(block);
    let ctx = Box::into_raw(Box::new(block)) as *mut c_void;
    let args: Vec<*mut C> = inputs
        .iter()
        .map(|t| t.as_ptr() as *mut C)
        .chain(params.iter().map(|t| t.as_ptr() as *mut C))
        .collect();
    let mut outputs: [*mut C; MAX_OUTPUTS] = [std::ptr::null_mut(); MAX_OUTPUTS];
    let mut n_outputs = 0usize;
    // SAFETY: `args` point to live tensors the shim only reads; it owns `ctx` from here
    // on and frees it with `drop_block`; the outputs are new handles we then own.
    let rc = unsafe {
        ffi::dbt_ckpt_apply(
            run_block,
            drop_block,
            ctx,
            args.as_ptr(),
            inputs.len(),
            params.len(),
            outputs.as_mut_ptr(),
            MAX_OUTPUTS,
            &mut n_outputs,
        )
    };
    if rc != 0 {
        // SAFETY: the shim keeps a NUL-terminated thread-local message.
        let why = unsafe { CStr::from_ptr(ffi::dbt_ckpt_last_error()) }.to_string_lossy().into_owned();
        panic!("gradient checkpointing failed: {why}");
    }
    // SAFETY: the shim wrote `n_outputs` new handles.
    outputs[..n_outputs].iter().map(|&p| unsafe { Tensor::from_ptr(p) }).collect()
}

/// A pointer to a block the recomputation calls (see the module's note on lifetime).
struct BlockRef<T>(*const T);

impl<T> BlockRef<T> {
    /// SAFETY: the caller keeps the block alive and in place while the graph lives.
    unsafe fn get(&self) -> &T {
        &*self.0
    }
}

/// Checkpoint only where it saves something: gradients are recorded and some
/// input or parameter needs one. Returns the parameters to pass.
fn worth_checkpointing(inputs: &[&Tensor], block: &dyn Parameters) -> Option<Vec<Tensor>> {
    if !grad_enabled() {
        return None;
    }
    let mut params = Vec::new();
    block.collect(&mut params);
    params.retain(|p| p.requires_grad());
    if params.is_empty() && !inputs.iter().any(|t| t.requires_grad()) {
        return None;
    }
    Some(params)
}

/// `ResnetBlock2D::forward` with the UNet's time embedding, checkpointed when `on`.
pub fn resnet(r: &ResnetBlock2D, x: &Tensor, temb: &Tensor, on: bool) -> Tensor {
    let params = if on { worth_checkpointing(&[x, temb], r) } else { None };
    let Some(params) = params else { return r.forward(x, Some(temb)) };
    let block = BlockRef(r as *const ResnetBlock2D);
    // SAFETY: see BlockRef; the resnet sits in its block's Vec.
    checkpoint(&[x, temb], &params, move |t| vec![unsafe { block.get() }.forward(&t[0], Some(&t[1]))]).remove(0)
}

/// `Transformer2DModel::forward`, checkpointed when `on`.
pub fn transformer(m: &Transformer2DModel, x: &Tensor, context: &Tensor, on: bool) -> Tensor {
    let params = if on { worth_checkpointing(&[x, context], m) } else { None };
    let Some(params) = params else { return m.forward(x, context) };
    let block = BlockRef(m as *const Transformer2DModel);
    // SAFETY: see BlockRef; the transformer sits in its block's Vec.
    checkpoint(&[x, context], &params, move |t| vec![unsafe { block.get() }.forward(&t[0], &t[1])]).remove(0)
}

/// `ClipEncoderLayer::forward`, checkpointed when `on`.
pub fn clip_layer(l: &ClipEncoderLayer, x: &Tensor, on: bool) -> Tensor {
    let params = if on { worth_checkpointing(&[x], l) } else { None };
    let Some(params) = params else { return l.forward(x) };
    let block = BlockRef(l as *const ClipEncoderLayer);
    // SAFETY: see BlockRef; the layer sits in the encoder's Vec.
    checkpoint(&[x], &params, move |t| vec![unsafe { block.get() }.forward(&t[0])]).remove(0)
}

/// The tensors a block computes with (weights, biases, LoRA adapters).
pub trait Parameters {
    fn collect(&self, out: &mut Vec<Tensor>);
}

impl Parameters for Linear {
    fn collect(&self, out: &mut Vec<Tensor>) {
        out.push(self.weight.shallow_clone());
        out.extend(self.bias.iter().map(Tensor::shallow_clone));
        if let Some(l) = &self.lora {
            out.extend([l.down.shallow_clone(), l.up.shallow_clone()]);
        }
    }
}

impl Parameters for Conv2d {
    fn collect(&self, out: &mut Vec<Tensor>) {
        out.push(self.weight.shallow_clone());
        out.extend(self.bias.iter().map(Tensor::shallow_clone));
        if let Some(l) = &self.lora {
            out.extend([l.down.shallow_clone(), l.up.shallow_clone()]);
        }
    }
}

impl Parameters for GroupNorm {
    fn collect(&self, out: &mut Vec<Tensor>) {
        out.extend([self.weight.shallow_clone(), self.bias.shallow_clone()]);
    }
}

impl Parameters for LayerNorm {
    fn collect(&self, out: &mut Vec<Tensor>) {
        out.extend([self.weight.shallow_clone(), self.bias.shallow_clone()]);
    }
}

impl Parameters for ResnetBlock2D {
    fn collect(&self, out: &mut Vec<Tensor>) {
        self.norm1.collect(out);
        self.conv1.collect(out);
        if let Some(t) = &self.time_emb_proj {
            t.collect(out);
        }
        self.norm2.collect(out);
        self.conv2.collect(out);
        if let Some(c) = &self.conv_shortcut {
            c.collect(out);
        }
    }
}

impl Parameters for CrossAttention {
    fn collect(&self, out: &mut Vec<Tensor>) {
        for l in [&self.to_q, &self.to_k, &self.to_v, &self.to_out] {
            l.collect(out);
        }
    }
}

impl Parameters for BasicTransformerBlock {
    fn collect(&self, out: &mut Vec<Tensor>) {
        self.norm1.collect(out);
        self.attn1.collect(out);
        self.norm2.collect(out);
        self.attn2.collect(out);
        self.norm3.collect(out);
        self.ff.geglu_proj.collect(out);
        self.ff.out.collect(out);
    }
}

impl Parameters for Projection {
    fn collect(&self, out: &mut Vec<Tensor>) {
        match self {
            Projection::Conv(c) => c.collect(out),
            Projection::Linear(l) => l.collect(out),
        }
    }
}

impl Parameters for Transformer2DModel {
    fn collect(&self, out: &mut Vec<Tensor>) {
        self.norm.collect(out);
        self.proj_in.collect(out);
        for b in &self.transformer_blocks {
            b.collect(out);
        }
        self.proj_out.collect(out);
    }
}

impl Parameters for ClipEncoderLayer {
    fn collect(&self, out: &mut Vec<Tensor>) {
        let a = &self.self_attn;
        for l in [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj] {
            l.collect(out);
        }
        self.layer_norm1.collect(out);
        self.mlp.fc1.collect(out);
        self.mlp.fc2.collect(out);
        self.layer_norm2.collect(out);
    }
}

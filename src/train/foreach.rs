//! Multi-tensor kernels (src/shim/foreach_shim.cpp): fused AdamW, the fp16
//! unscale-and-check, the global gradient norm, list copies and the EMA update.
//! A per-parameter loop on CUDA is launch-bound (an SD 1.5 UNet has ~700
//! parameter tensors, AdamW needs ~8 kernels each) and the per-parameter
//! overflow check synchronised ~700 times a step. AdamW, the unscale and the
//! norm keep their per-parameter code on the CPU, which matches PyTorch's
//! single-tensor operations op for op (the reference parity tests); the copy and
//! the EMA update give the same numbers either way and run everywhere.

use tch::{Device, Kind, Tensor};

mod ffi {
    use torch_sys::C_tensor;
    extern "C" {
        pub fn dbt_foreach_last_error() -> *const std::os::raw::c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn dbt_fused_adamw(
            params: *const *mut C_tensor,
            grads: *const *mut C_tensor,
            exp_avgs: *const *mut C_tensor,
            exp_avg_sqs: *const *mut C_tensor,
            n: usize,
            step: *mut C_tensor,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> i32;
        pub fn dbt_foreach_unscale(grads: *const *mut C_tensor, n: usize, found_inf: *mut C_tensor, inv_scale: *mut C_tensor) -> i32;
        pub fn dbt_foreach_total_norm(ts: *const *mut C_tensor, n: usize) -> *mut C_tensor;
        pub fn dbt_foreach_mul_(ts: *const *mut C_tensor, n: usize, factor: *mut C_tensor) -> i32;
        pub fn dbt_foreach_zero_(ts: *const *mut C_tensor, n: usize) -> i32;
        pub fn dbt_foreach_copy_(dst: *const *mut C_tensor, src: *const *mut C_tensor, n: usize) -> i32;
        pub fn dbt_foreach_ema_(shadow: *const *mut C_tensor, params: *const *mut C_tensor, n: usize, one_minus: f64) -> i32;
    }
}

fn last_error() -> String {
    // SAFETY: a NUL-terminated thread-local string owned by the shim.
    unsafe { std::ffi::CStr::from_ptr(ffi::dbt_foreach_last_error()) }.to_string_lossy().into_owned()
}

fn pointers(ts: &[Tensor]) -> Vec<*mut torch_sys::C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut torch_sys::C_tensor).collect()
}

fn check(rc: i32, what: &str) -> anyhow::Result<()> {
    if rc != 0 {
        anyhow::bail!("{what} failed: {}", last_error());
    }
    Ok(())
}

/// Whether the multi-tensor path applies to a list led by `first`: float32 on a CUDA device.
pub fn applies(first: Option<&Tensor>) -> bool {
    first.is_some_and(|t| matches!(t.device(), Device::Cuda(_)) && t.kind() == Kind::Float)
}

/// `torch._fused_adamw_` over matching lists; `step` is the step number already counted.
#[allow(clippy::too_many_arguments)]
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: u64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    eps: f64,
) -> anyhow::Result<()> {
    let n = params.len();
    assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n, "fused AdamW lists differ in length");
    if n == 0 {
        return Ok(());
    }
    let step = crate::device::upload(&Tensor::from(step as f32), params[0].device());
    let (p, g, m, v) = (pointers(params), pointers(grads), pointers(exp_avgs), pointers(exp_avg_sqs));
    // SAFETY: every pointer is a live tensor held by the slices above for the call.
    let rc = unsafe {
        ffi::dbt_fused_adamw(p.as_ptr(), g.as_ptr(), m.as_ptr(), v.as_ptr(), n, step.as_ptr() as *mut _, lr, beta1, beta2, weight_decay, eps)
    };
    check(rc, "the fused AdamW step")
}

/// Multiplies every gradient by `inv_scale`; true when any was inf or nan (one sync).
pub fn unscale(grads: &[Tensor], inv_scale: f64) -> anyhow::Result<bool> {
    if grads.is_empty() {
        return Ok(false);
    }
    let device = grads[0].device();
    let found_inf = Tensor::zeros([1], (Kind::Float, device));
    let inv = crate::device::upload(&Tensor::from_slice(&[inv_scale as f32]), device);
    let g = pointers(grads);
    // SAFETY: live tensors for the duration of the call.
    let rc = unsafe { ffi::dbt_foreach_unscale(g.as_ptr(), g.len(), found_inf.as_ptr() as *mut _, inv.as_ptr() as *mut _) };
    check(rc, "the fp16 gradient unscale")?;
    Ok(found_inf.double_value(&[0]) != 0.0)
}

/// clip_grad_norm_ (norm 2) with two multi-tensor kernels; returns the total norm
/// as a device tensor (reading it would synchronise).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> anyhow::Result<Tensor> {
    let g = pointers(grads);
    // SAFETY: live tensors for the duration of the call; the result is a new tensor we own.
    let raw = unsafe { ffi::dbt_foreach_total_norm(g.as_ptr(), g.len()) };
    if raw.is_null() {
        anyhow::bail!("the gradient norm failed: {}", last_error());
    }
    let total = unsafe { Tensor::from_ptr(raw) };
    let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
    // SAFETY: as above.
    let rc = unsafe { ffi::dbt_foreach_mul_(g.as_ptr(), g.len(), coef.as_ptr() as *mut _) };
    check(rc, "the gradient clipping")?;
    Ok(total)
}

/// `ts[i].zero_()` for a list, as `torch._foreach_zero_` (any device).
pub fn zero(ts: &[Tensor]) -> anyhow::Result<()> {
    if ts.is_empty() {
        return Ok(());
    }
    let t = pointers(ts);
    // SAFETY: live tensors for the duration of the call.
    let rc = unsafe { ffi::dbt_foreach_zero_(t.as_ptr(), t.len()) };
    check(rc, "zeroing the gradients")
}

/// `dst[i].copy_(src[i])` for matching lists, as `torch._foreach_copy_` (any device).
pub fn copy(dst: &[Tensor], src: &[Tensor]) -> anyhow::Result<()> {
    assert_eq!(dst.len(), src.len(), "foreach copy lists differ in length");
    if dst.is_empty() {
        return Ok(());
    }
    let (d, s) = (pointers(dst), pointers(src));
    // SAFETY: live tensors for the duration of the call.
    let rc = unsafe { ffi::dbt_foreach_copy_(d.as_ptr(), s.as_ptr(), d.len()) };
    check(rc, "the parameter copy")
}

/// `shadow[i] -= (shadow[i] - params[i]) × one_minus` in multi-tensor launches
/// (any device; the same numbers as the per-tensor loop). The caller bounds the
/// lists: the differences are all allocated at once.
pub fn ema_update(shadow: &[Tensor], params: &[Tensor], one_minus: f64) -> anyhow::Result<()> {
    assert_eq!(shadow.len(), params.len(), "EMA lists differ in length");
    if shadow.is_empty() {
        return Ok(());
    }
    let (s, p) = (pointers(shadow), pointers(params));
    // SAFETY: live tensors for the duration of the call.
    let rc = unsafe { ffi::dbt_foreach_ema_(s.as_ptr(), p.as_ptr(), s.len(), one_minus) };
    check(rc, "the EMA update")
}

//! `training.fused_backward`: each trained tensor is updated by the optimizer
//! the moment its gradient is complete in the backward pass, and that gradient
//! is freed at once, so the whole set of gradients never exists at the same
//! time (kohya's fused backward pass; PyTorch's post-accumulate-grad hooks).
//! The update is the optimizer's own per-parameter update, so a fused step
//! equals a plain one wherever nothing needs every gradient at once: no
//! clipping by the global norm, no accumulation, no fp16 loss scaling (the
//! config refuses those).

use std::ffi::c_void;

use tch::Tensor;

use super::optimizer::Optimizer;

mod ffi {
    use std::ffi::c_void;
    pub type GradReadyFn = unsafe extern "C" fn(*mut c_void, usize) -> i32;
    extern "C" {
        pub fn dbt_set_grad_ready_hook(t: *mut torch_sys::C_tensor, f: Option<GradReadyFn>, ctx: *mut c_void, index: usize) -> i32;
    }
}

/// What the hooks reach while a step runs.
struct HookState {
    /// The optimizer of the step under way; null between steps, when a
    /// gradient is left where it is.
    optimizer: *mut Optimizer,
    lr: f64,
    /// A panic inside the update, reported after the backward pass (a panic must
    /// not unwind through libtorch).
    failure: Option<String>,
}

/// The hooks on a run's trained tensors. Dropping it removes them.
pub struct FusedBackward {
    /// Boxed: the hooks hold its address.
    state: Box<HookState>,
    params: Vec<Tensor>,
}

/// The hook: updates parameter `index` through the step's optimizer.
unsafe extern "C" fn grad_ready(ctx: *mut c_void, index: usize) -> i32 {
    // SAFETY: `ctx` is the boxed HookState of a live FusedBackward (its Drop
    // removes the hooks first); libtorch runs one backward pass's hooks one at a
    // time, while the thread that started the pass waits in `run`.
    let state = unsafe { &mut *(ctx as *mut HookState) };
    if state.optimizer.is_null() {
        return 0;
    }
    // SAFETY: set by `run` to an optimizer it borrows mutably for the pass.
    let optimizer = unsafe { &mut *state.optimizer };
    let lr = state.lr;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| optimizer.update_param(index, lr))) {
        Ok(()) => 1,
        Err(payload) => {
            state.failure.get_or_insert_with(|| crate::error::panic_sentence(payload.as_ref(), "a fused optimizer update"));
            0
        }
    }
}

impl FusedBackward {
    /// Hooks every tensor of `optimizer` (each must be a leaf).
    pub fn install(optimizer: &Optimizer) -> anyhow::Result<FusedBackward> {
        let mut state = Box::new(HookState { optimizer: std::ptr::null_mut(), lr: 0.0, failure: None });
        let ctx = &mut *state as *mut HookState as *mut c_void;
        let params: Vec<Tensor> = optimizer.params().iter().map(|(_, p)| p.shallow_clone()).collect();
        let hooked = FusedBackward { state, params };
        for (index, p) in hooked.params.iter().enumerate() {
            // SAFETY: a live tensor; the callback and context outlive the hook (see Drop).
            let rc = unsafe { ffi::dbt_set_grad_ready_hook(p.as_ptr() as *mut _, Some(grad_ready), ctx, index) };
            if rc != 0 {
                anyhow::bail!("libtorch refused a gradient hook on `{}`", optimizer.params()[index].0);
            }
        }
        Ok(hooked)
    }

    /// Runs `backward` as a fused optimizer step at learning rate `lr`: each
    /// tensor is updated and its gradient freed as soon as it is ready.
    pub fn run<T>(&mut self, optimizer: &mut Optimizer, lr: f64, backward: impl FnOnce() -> T) -> anyhow::Result<T> {
        optimizer.begin_step();
        self.state.optimizer = optimizer;
        self.state.lr = lr;
        let out = backward();
        self.state.optimizer = std::ptr::null_mut();
        match self.state.failure.take() {
            Some(why) => anyhow::bail!(why),
            None => Ok(out),
        }
    }
}

impl Drop for FusedBackward {
    fn drop(&mut self) {
        for p in &self.params {
            // SAFETY: removes the hook this value set; the tensor is alive.
            unsafe { ffi::dbt_set_grad_ready_hook(p.as_ptr() as *mut _, None, std::ptr::null_mut(), 0) };
        }
    }
}

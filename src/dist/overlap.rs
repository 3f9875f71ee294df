//! Gradient averaging that overlaps the backward pass, as torch's DDP Reducer
//! does: a hook on each trained tensor (PyTorch's post-accumulate-grad hook,
//! the one `training.fused_backward` uses) says when its gradient is complete;
//! a bucket whose tensors are all complete is started at once, in bucket order
//! (reverse parameter order, the order backward finishes them), while backward
//! goes on with the earlier layers. Only the last micro-batch of an accumulated
//! step is armed (DDP's `no_sync` for the others). `finish` starts what backward
//! never completed (a tensor this rank has no gradient for, a rank without rows
//! in a short batch), waits for all, and writes the means back through the same
//! `BucketPlan` as averaging after backward, so both give the same bits.
//!
//! Why not c10d's own Reducer: its constructor and `prepare_for_backward`
//! change between torch releases and expect a `ProcessGroup` wrapper, DDP's
//! logger and Python-side bookkeeping; the hook and `Backend::allreduce` used
//! here are the small, stable part of it.

use std::ffi::c_void;

use tch::Tensor;

use super::buckets::{bucket_bytes, BucketPlan};
use super::group::{PendingReduce, ProcessGroup, Reduce};

mod ffi {
    use std::ffi::c_void;
    pub type GradReadyFn = unsafe extern "C" fn(*mut c_void, usize) -> i32;
    extern "C" {
        pub fn dbt_set_grad_ready_hook(t: *mut torch_sys::C_tensor, f: Option<GradReadyFn>, ctx: *mut c_void, index: usize) -> i32;
    }
}

/// Whether to average during the backward pass: yes unless
/// `DREAMBOOTH_DIST_OVERLAP=0` asks for averaging after it (to compare the two).
pub fn wanted() -> bool {
    std::env::var("DREAMBOOTH_DIST_OVERLAP").map_or(true, |v| v != "0")
}

/// What the hooks reach while a backward pass runs.
struct HookState {
    group: &'static ProcessGroup,
    params: Vec<Tensor>,
    cap_bytes: usize,
    /// Set for the backward pass whose gradients are to be averaged.
    armed: bool,
    plan: BucketPlan,
    /// Each parameter's bucket (None: it does not train now).
    bucket_of: Vec<Option<usize>>,
    /// Per bucket, how many of its tensors have yet to complete.
    missing: Vec<usize>,
    /// The buckets started, in order; the next to start is `started.len()`.
    started: Vec<(Tensor, PendingReduce)>,
    /// Buckets started from inside a backward pass, over the run (for the log).
    started_early: u64,
    /// The first failure inside a hook, reported by `finish` (a hook must not
    /// unwind through libtorch).
    failure: Option<String>,
}

impl HookState {
    /// A fresh plan for the tensors that train now.
    fn prepare(&mut self) {
        self.plan = BucketPlan::new(&self.params, self.cap_bytes);
        self.bucket_of = vec![None; self.params.len()];
        self.missing = self.plan.buckets.iter().map(Vec::len).collect();
        for (b, bucket) in self.plan.buckets.iter().enumerate() {
            for &t in bucket {
                self.bucket_of[self.plan.trained[t]] = Some(b);
            }
        }
        self.started.clear();
        self.failure = None;
    }

    /// Starts bucket after bucket while the next in order is complete (every
    /// rank starts them in the same order, as the collectives must be).
    fn start_complete_buckets(&mut self, all: bool) -> anyhow::Result<()> {
        while self.started.len() < self.plan.buckets.len() && (all || self.missing[self.started.len()] == 0) {
            let b = self.started.len();
            let flat = self.plan.flatten(&self.params, b, self.group.device);
            let pending = self.group.start_all_reduce(&flat, Reduce::Sum)?;
            self.started.push((flat, pending));
            if !all {
                self.started_early += 1;
            }
        }
        Ok(())
    }

    fn gradient_complete(&mut self, index: usize) -> anyhow::Result<()> {
        let Some(b) = self.bucket_of.get(index).copied().flatten() else { return Ok(()) };
        if self.missing[b] == 0 {
            return Ok(());
        }
        self.missing[b] -= 1;
        self.start_complete_buckets(false)
    }
}

/// The hook: parameter `index`'s gradient is complete. It never frees the gradient.
unsafe extern "C" fn on_gradient_complete(ctx: *mut c_void, index: usize) -> i32 {
    // SAFETY: `ctx` is the boxed HookState of a live OverlappedAveraging (its Drop
    // removes the hooks first); libtorch runs one pass's hooks one at a time,
    // while the thread that started the pass waits for it.
    let state = unsafe { &mut *(ctx as *mut HookState) };
    if !state.armed || state.failure.is_some() {
        return 0;
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.gradient_complete(index))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => state.failure = Some(format!("{e:#}")),
        Err(payload) => {
            state.failure = Some(crate::error::panic_sentence(payload.as_ref(), "starting a gradient bucket"));
        }
    }
    0
}

/// The hooks on a run's trained tensors. Dropping it removes them.
pub struct OverlappedAveraging {
    /// Boxed: the hooks hold its address.
    state: Box<HookState>,
    reported: bool,
}

impl OverlappedAveraging {
    /// Hooks every tensor of `params` (each must be a leaf).
    pub fn install(group: &'static ProcessGroup, params: &[(String, Tensor)]) -> anyhow::Result<OverlappedAveraging> {
        let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let cap_bytes = bucket_bytes();
        let mut state = Box::new(HookState {
            group,
            plan: BucketPlan::new(&[], cap_bytes),
            params: tensors,
            cap_bytes,
            armed: false,
            bucket_of: Vec::new(),
            missing: Vec::new(),
            started: Vec::new(),
            started_early: 0,
            failure: None,
        });
        let ctx = &mut *state as *mut HookState as *mut c_void;
        let hooked = OverlappedAveraging { state, reported: false };
        for (index, p) in hooked.state.params.iter().enumerate() {
            // SAFETY: a live tensor; the callback and context outlive the hook (see Drop).
            let rc = unsafe { ffi::dbt_set_grad_ready_hook(p.as_ptr() as *mut _, Some(on_gradient_complete), ctx, index) };
            if rc != 0 {
                anyhow::bail!("libtorch refused a gradient hook on `{}`", params[index].0);
            }
        }
        Ok(hooked)
    }

    /// Arms the hooks for the next backward pass: the last micro-batch of a step.
    /// The buckets are planned afresh (the text encoder may have stopped training).
    pub fn arm(&mut self) {
        self.state.prepare();
        self.state.armed = true;
    }

    /// After the step's last backward pass (or in place of it, on a rank with
    /// no rows): starts the buckets not started yet, waits for all, and makes
    /// each trained tensor's gradient its mean over the ranks.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if !self.state.armed {
            self.state.prepare();
        }
        self.state.armed = false;
        if let Some(why) = self.state.failure.take() {
            self.state.started.clear();
            anyhow::bail!(why);
        }
        let state = &mut *self.state;
        if state.plan.trained.is_empty() {
            return Ok(());
        }
        state.start_complete_buckets(true)?;
        let group = state.group;
        let holders = state.plan.holders(&state.params, group.device);
        let counted = group.start_all_reduce(&holders, Reduce::Sum)?;
        let mut flats = Vec::with_capacity(state.started.len());
        for (flat, pending) in state.started.drain(..) {
            pending.wait()?;
            flats.push(flat);
        }
        counted.wait()?;
        state.plan.write_back(&state.params, &flats, &holders, group.world);
        Ok(())
    }

    /// Once, after the first step: how the gradients travelled (for the log).
    pub fn first_report(&mut self) -> Option<String> {
        if self.reported {
            return None;
        }
        self.reported = true;
        let state = &self.state;
        Some(format!(
            "gradients averaged in {} bucket(s) of at most {:.2} MB; {} started while the backward pass was still running",
            state.plan.buckets.len(),
            state.cap_bytes as f64 / (1024.0 * 1024.0),
            state.started_early
        ))
    }
}

impl Drop for OverlappedAveraging {
    fn drop(&mut self) {
        for p in &self.state.params {
            // SAFETY: removes the hook this value set; the tensor is alive.
            unsafe { ffi::dbt_set_grad_ready_hook(p.as_ptr() as *mut _, None, std::ptr::null_mut(), 0) };
        }
    }
}

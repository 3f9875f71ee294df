//! CUDA graphs for the training step (src/shim/cuda_shim.cpp): a micro-batch's
//! forward, loss and backward are captured once and then replayed, so the
//! thousands of kernels of an SD UNet step cost one launch instead of one CPU
//! dispatch each. At batch 1 the step is bound by those dispatches (see
//! benches/README.md): the GPU finishes each kernel before the CPU has queued the
//! next.
//!
//! A capture records kernels and memory addresses, not values: the graph reads
//! its inputs from fixed tensors (copied into before each replay), writes its
//! loss to a fixed tensor and accumulates into the parameters' existing
//! gradient tensors, which therefore must never be replaced (zeroed in place,
//! never set to None) while the graph lives.

use std::ffi::c_void;

use tch::{Device, Tensor};

mod ffi {
    use std::ffi::c_void;
    extern "C" {
        pub fn dbt_graph_last_error() -> *const std::os::raw::c_char;
        pub fn dbt_cuda_use_side_stream(device: i32) -> i32;
        pub fn dbt_graph_new() -> *mut c_void;
        pub fn dbt_graph_free(graph: *mut c_void);
        pub fn dbt_graph_op(graph: *mut c_void, op: i32) -> i32;
        pub fn dbt_cuda_empty_cache() -> i32;
        pub fn dbt_autocast_cache_set(enabled: i32) -> i32;
    }
}

/// The shim's last libtorch message, first line only (no C++ backtrace).
fn last_error() -> String {
    // SAFETY: a NUL-terminated thread-local string owned by the shim.
    let text = unsafe { std::ffi::CStr::from_ptr(ffi::dbt_graph_last_error()) }.to_string_lossy().into_owned();
    text.lines().next().unwrap_or("").trim().to_string()
}

fn check(rc: i32, what: &str) -> anyhow::Result<()> {
    match rc {
        0 => Ok(()),
        -1 => anyhow::bail!("{what}: this build has no CUDA"),
        _ => anyhow::bail!("{what}: {}", last_error()),
    }
}

/// Makes a side stream the current stream of this thread on `device` (capture
/// cannot use the default stream; everything after runs on the side stream).
pub fn use_side_stream(device: Device) -> anyhow::Result<()> {
    let Device::Cuda(index) = device else { anyhow::bail!("CUDA graphs need a CUDA device") };
    // Pool streams do not wait for the default stream: let its work (model
    // casts, cached latents) finish first.
    tch::Cuda::synchronize(index as i64);
    // SAFETY: a plain call into the CUDA stream registry.
    check(unsafe { ffi::dbt_cuda_use_side_stream(index as i32) }, "choosing a CUDA stream")
}

/// Returns the caching allocator's unused blocks to the driver.
pub fn empty_cache() {
    // SAFETY: a plain call into the caching allocator.
    let _ = unsafe { ffi::dbt_cuda_empty_cache() };
}

/// A captured CUDA graph, freed on drop.
pub struct CudaGraph {
    raw: *mut c_void,
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `raw` came from dbt_graph_new and is freed once.
        unsafe { ffi::dbt_graph_free(self.raw) }
    }
}

impl CudaGraph {
    /// Captures what `body` queues on the current (side) stream and returns the
    /// graph with `body`'s result, whose tensors live in the graph's memory and
    /// are rewritten by each replay. The capture only records: nothing has run
    /// until the first `replay`. A failure inside `body` (a libtorch panic: an
    /// operation that cannot be captured) ends the capture and is returned.
    pub fn capture<T>(device: Device, body: impl FnOnce() -> T) -> anyhow::Result<(CudaGraph, T)> {
        // SAFETY: allocates a graph object; null on failure.
        let raw = unsafe { ffi::dbt_graph_new() };
        if raw.is_null() {
            anyhow::bail!("creating a CUDA graph: {}", last_error());
        }
        let graph = CudaGraph { raw };
        // As torch.cuda.graph: start from an idle device.
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        // SAFETY: a live graph; op 0 begins the capture.
        check(unsafe { ffi::dbt_graph_op(graph.raw, 0) }, "beginning a CUDA graph capture")?;
        // Autocast's cast cache would keep casts made during capture beyond it.
        // SAFETY: thread-local autocast state.
        let cache_was = unsafe { ffi::dbt_autocast_cache_set(0) };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
        if cache_was >= 0 {
            // SAFETY: as above; restores the previous setting.
            unsafe { ffi::dbt_autocast_cache_set(cache_was) };
        }
        // SAFETY: a live graph; op 1 ends the capture, also after a failure, so
        // the stream leaves capture mode.
        let ended = check(unsafe { ffi::dbt_graph_op(graph.raw, 1) }, "ending the CUDA graph capture");
        let value = match result {
            Ok(value) => value,
            Err(payload) => {
                let text = crate::error::panic_text(payload.as_ref());
                let message = crate::error::torch_failure(&text).unwrap_or(text);
                anyhow::bail!("capturing the training step: {message}")
            }
        };
        ended?;
        Ok((graph, value))
    }

    /// Runs the captured work again (queued on the current stream).
    pub fn replay(&self) -> anyhow::Result<()> {
        // SAFETY: a live, captured graph; op 2 replays it.
        check(unsafe { ffi::dbt_graph_op(self.raw, 2) }, "replaying the CUDA graph")
    }
}

/// The fixed input tensors of one captured micro-batch, on the device.
pub struct GraphInputs {
    pub latents: Tensor,
    pub noise: Tensor,
    pub timesteps: Tensor,
    pub ids: Tensor,
    /// SDXL's size and crop ids `[batch, 6]` (unused by SD 1.x/2.x).
    pub time_ids: Tensor,
    pub coefficients: Tensor,
    /// `masked_loss`: the loss weights `[batch, 1, h, w]` (every batch of a masked
    /// run has them, ones where an image has no mask, so one graph serves all).
    pub loss_weights: Option<Tensor>,
}

impl GraphInputs {
    fn tensors(&self) -> Vec<&Tensor> {
        let fixed = [&self.latents, &self.noise, &self.timesteps, &self.ids, &self.time_ids, &self.coefficients];
        fixed.into_iter().chain(self.loss_weights.as_ref()).collect()
    }

    /// Tensors with `from`'s shapes and dtypes on `device`, holding its values.
    pub fn copy_of(from: &GraphInputs, device: Device) -> GraphInputs {
        let on = |t: &Tensor| t.to_device(device).copy();
        GraphInputs {
            latents: on(&from.latents),
            noise: on(&from.noise),
            timesteps: on(&from.timesteps),
            ids: on(&from.ids),
            time_ids: on(&from.time_ids),
            coefficients: on(&from.coefficients),
            loss_weights: from.loss_weights.as_ref().map(on),
        }
    }

    fn fill_from(&self, from: &GraphInputs) {
        for (to, from) in self.tensors().into_iter().zip(from.tensors()) {
            to.shallow_clone().copy_(from);
        }
    }

    fn shape_key(&self) -> Vec<Vec<i64>> {
        self.tensors().iter().map(|t| t.size()).collect()
    }
}

/// One captured (or warming-up) micro-batch shape.
struct Entry {
    shapes: Vec<Vec<i64>>,
    text_encoder_training: bool,
    inputs: GraphInputs,
    warmed_up: u32,
    captured: Option<Captured>,
}

enum Captured {
    /// The graph and its loss tensor (rewritten by each replay).
    Graph(CudaGraph, Tensor),
    /// `StepGraphs::simulated`: "replay" runs the step eagerly on the fixed inputs.
    Simulated,
}

/// Eager micro-batches of a shape before it is captured: lazy initialisation
/// (cuBLAS workspaces, cuDNN plans, the gradient tensors) must happen outside
/// the capture.
pub const WARMUP_MICRO_BATCHES: u32 = 2;

/// The training step's graph: the first micro-batch shape (and text-encoder
/// phase) to finish warming up is captured.
pub struct StepGraphs {
    device: Device,
    entries: Vec<Entry>,
    /// Set when a capture failed: the run goes on eagerly and says why.
    failed: Option<String>,
    failure_reported: bool,
    /// Whether this thread runs on the side stream yet (switched at the first
    /// micro-batch, on the thread that trains: the current stream is per thread).
    on_side_stream: bool,
    simulated: bool,
}

impl StepGraphs {
    pub fn new(device: Device) -> anyhow::Result<StepGraphs> {
        if !device.is_cuda() {
            anyhow::bail!("they need a CUDA device");
        }
        Ok(StepGraphs { device, entries: Vec::new(), failed: None, failure_reported: false, on_side_stream: false, simulated: false })
    }

    /// The same bookkeeping on any device with capture and replay simulated by
    /// eager runs on the fixed inputs: lets a CPU test check that a graph run
    /// trains exactly as a plain one (inputs copied in, gradients kept and zeroed
    /// in place, the text-encoder phase, other shapes eager). A test hook.
    pub fn simulated(device: Device) -> StepGraphs {
        StepGraphs { device, entries: Vec::new(), failed: None, failure_reported: false, on_side_stream: true, simulated: true }
    }

    /// Forgets every graph (the trained tensors changed: the text encoder stopped
    /// training and its gradients are gone).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// "captured", "warming up" or "failed: …".
    pub fn state(&self) -> String {
        match &self.failed {
            Some(why) => format!("failed: {why}"),
            None if self.entries.iter().any(|e| e.captured.is_some()) => "captured".into(),
            None => "warming up".into(),
        }
    }

    /// Whether a failure turned graphs off for the rest of the run.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Why graphs stopped, once (for the run's warning).
    pub fn take_failure(&mut self) -> Option<String> {
        if self.failure_reported {
            return None;
        }
        let why = self.failed.clone()?;
        self.failure_reported = true;
        Some(why)
    }

    /// One micro-batch: `compute` runs forward, loss and backward on the inputs
    /// it is given (on the device or the CPU) and returns the (detached) loss. Eager while warming up,
    /// captured once, replayed after. Returns the loss as a device tensor, valid
    /// until the next call.
    /// `grads_ready`: every trained parameter has a gradient tensor, so that the
    /// captured backward adds into it (a capture without one would overwrite
    /// instead of accumulate).
    pub fn run(
        &mut self,
        batch: &GraphInputs,
        text_encoder_training: bool,
        grads_ready: bool,
        compute: &dyn Fn(&GraphInputs) -> Tensor,
    ) -> Tensor {
        if !self.on_side_stream && self.failed.is_none() {
            match use_side_stream(self.device) {
                Ok(()) => self.on_side_stream = true,
                Err(e) => self.failed = Some(e.to_string()),
            }
        }
        if self.failed.is_some() {
            return compute(batch);
        }
        let shapes = batch.shape_key();
        // One graph at a time: each holds its own memory pool, as large as a
        // step's activations. Another shape (an epoch's last, smaller batch) runs eagerly.
        let captured_other = self.entries.iter().any(|e| {
            e.captured.is_some() && (e.shapes != shapes || e.text_encoder_training != text_encoder_training)
        });
        if captured_other {
            return compute(batch);
        }
        let index = match self.entries.iter().position(|e| e.shapes == shapes && e.text_encoder_training == text_encoder_training) {
            Some(i) => i,
            None => {
                let inputs = GraphInputs::copy_of(batch, self.device);
                self.entries.push(Entry { shapes, text_encoder_training, inputs, warmed_up: 0, captured: None });
                self.entries.len() - 1
            }
        };
        let entry = &mut self.entries[index];
        entry.inputs.fill_from(batch);
        match &entry.captured {
            Some(Captured::Graph(graph, loss)) => match graph.replay() {
                Ok(()) => return loss.shallow_clone(),
                Err(e) => {
                    self.failed = Some(e.to_string());
                    self.entries.clear();
                    return compute(batch);
                }
            },
            Some(Captured::Simulated) => return compute(&entry.inputs),
            None => {}
        }
        if entry.warmed_up < WARMUP_MICRO_BATCHES || !grads_ready {
            entry.warmed_up += 1;
            return compute(&entry.inputs);
        }
        if self.simulated {
            entry.captured = Some(Captured::Simulated);
            return compute(&entry.inputs);
        }
        let captured = CudaGraph::capture(self.device, || compute(&entry.inputs)).and_then(|(graph, loss)| {
            graph.replay()?;
            Ok((graph, loss))
        });
        match captured {
            Ok((graph, loss)) => {
                entry.captured = Some(Captured::Graph(graph, loss.shallow_clone()));
                // The warm-up's eager activations are cached blocks no one needs now.
                empty_cache();
                loss
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                self.entries.clear();
                compute(batch)
            }
        }
    }
}

//! This process's place in a data-parallel run: joins the group that torchrun's
//! variables describe (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`; our `--nproc` launcher sets the same) through c10d's TCPStore,
//! and offers the collectives training needs on c10d's back end (NCCL on CUDA,
//! Gloo on the CPU; src/shim/dist_shim.cpp). One group per process, set once:
//! `current()` is None in a process that trains alone.

use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

mod ffi {
    use std::ffi::{c_char, c_void};
    extern "C" {
        pub fn dbt_dist_last_error() -> *const c_char;
        pub fn dbt_dist_backends() -> i32;
        pub fn dbt_dist_init(
            host: *const c_char,
            port: i32,
            rank: i32,
            world: i32,
            host_store: i32,
            prefix: *const c_char,
            backend: i32,
            cuda_index: i32,
            timeout_ms: i64,
        ) -> *mut c_void;
        pub fn dbt_dist_all_reduce(group: *mut c_void, tensors: *const *mut torch_sys::C_tensor, n: usize, op: i32) -> i32;
        pub fn dbt_dist_all_reduce_start(group: *mut c_void, tensor: *mut torch_sys::C_tensor, op: i32) -> *mut c_void;
        pub fn dbt_dist_work_finish(work: *mut c_void, wait: i32) -> i32;
        pub fn dbt_dist_broadcast(group: *mut c_void, tensor: *mut torch_sys::C_tensor, root: i32) -> i32;
        pub fn dbt_dist_barrier(group: *mut c_void, name: *const c_char, world: i32, timeout_ms: i64) -> i32;
        pub fn dbt_dist_set_grad(param: *mut torch_sys::C_tensor, grad: *mut torch_sys::C_tensor);
    }
}

/// The reductions of `all_reduce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    Sum = 0,
    Max = 1,
}

/// What to install when this build has no c10d back end.
pub const MISSING_BACKEND: &str = "this build has no c10d back end for several processes: install Gloo's headers \
     (`apt-get install libgloo-dev`, or set DREAMBOOTH_GLOO_INCLUDE to a folder holding gloo/) and rebuild";

/// Whether this build can join a process group (Gloo compiled in).
pub fn available() -> bool {
    // SAFETY: a constant answer of the shim.
    unsafe { ffi::dbt_dist_backends() & 1 != 0 }
}

/// Whether this build has NCCL (for CUDA tensors).
pub fn has_nccl() -> bool {
    // SAFETY: a constant answer of the shim.
    unsafe { ffi::dbt_dist_backends() & 2 != 0 }
}

/// A joined process group.
pub struct ProcessGroup {
    handle: *mut c_void,
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Where the collectives' tensors live (NCCL reduces CUDA tensors only).
    pub device: Device,
    pub backend: &'static str,
    timeout: Duration,
    barriers: AtomicU64,
}

// SAFETY: the c10d back end is thread-safe; the handle lives as long as the process.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

static GROUP: OnceLock<ProcessGroup> = OnceLock::new();

/// The group this process has joined, if any.
pub fn current() -> Option<&'static ProcessGroup> {
    GROUP.get()
}

/// This process's rank (0 alone).
pub fn rank() -> usize {
    current().map_or(0, |g| g.rank)
}

/// The number of processes training together (1 alone).
pub fn world_size() -> usize {
    current().map_or(1, |g| g.world)
}

/// Whether this process writes the run directory: rank 0, or a process alone.
pub fn is_writer() -> bool {
    rank() == 0
}

/// Torchrun's description of this process's place, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE`).
    pub agent_store: bool,
    /// torchrun's restart count: each attempt keys the shared store apart.
    pub attempt: u64,
}

/// The placement torchrun's variables give, None when `WORLD_SIZE` is unset, an
/// error naming the variable when one is malformed or missing.
pub fn placement_from_env() -> anyhow::Result<Option<Placement>> {
    placement_from(|name| std::env::var(name).ok())
}

fn placement_from(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Placement>> {
    let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
    let number = |name: &str, value: Option<String>| -> anyhow::Result<usize> {
        let value = value.ok_or_else(|| crate::error::usage(format!("{name} is not set although WORLD_SIZE is")))?;
        value.trim().parse().map_err(|_| crate::error::usage(format!("{name}={value} is not a whole number")))
    };
    let world = number("WORLD_SIZE", Some(world))?;
    let rank = number("RANK", var("RANK"))?;
    let local_rank = match var("LOCAL_RANK") {
        Some(v) => number("LOCAL_RANK", Some(v))?,
        None => rank,
    };
    if world == 0 || rank >= world {
        return Err(crate::error::usage(format!("RANK={rank} is not below WORLD_SIZE={world}")));
    }
    let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
    let port = number("MASTER_PORT", var("MASTER_PORT").or_else(|| Some("29500".into())))?;
    let master_port =
        u16::try_from(port).map_err(|_| crate::error::usage(format!("MASTER_PORT={port} is not a TCP port")))?;
    let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let attempt = var("TORCHELASTIC_RESTART_COUNT").and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Some(Placement { rank, world, local_rank, master_addr, master_port, agent_store, attempt }))
}

/// The collectives' time-out: `DREAMBOOTH_DIST_TIMEOUT` seconds, else 30
/// minutes as torch's (rank 0 writes checkpoints and previews while the others
/// wait in the next collective, so it must outlast those).
pub fn collective_timeout() -> Duration {
    let seconds = std::env::var("DREAMBOOTH_DIST_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0);
    Duration::from_secs_f64(seconds.unwrap_or(1800.0))
}

/// Joins the group torchrun's variables describe, once, if they are set and say
/// more than one process. `cuda`: the run trains on CUDA (NCCL where compiled in,
/// else Gloo through host copies). Before this, nothing may have used CUDA: each
/// local rank is given its GPU by narrowing `CUDA_VISIBLE_DEVICES`.
pub fn join_from_env(cuda: bool) -> anyhow::Result<Option<&'static ProcessGroup>> {
    if let Some(g) = current() {
        return Ok(Some(g));
    }
    let Some(place) = placement_from_env()? else { return Ok(None) };
    if place.world == 1 {
        return Ok(None);
    }
    if !available() {
        return Err(crate::error::usage(MISSING_BACKEND));
    }
    if cuda {
        narrow_visible_gpus(place.local_rank);
    }
    let use_nccl = cuda && has_nccl();
    let device = if use_nccl { Device::Cuda(0) } else { Device::Cpu };
    let timeout = collective_timeout();
    let host = CString::new(place.master_addr.clone()).context("MASTER_ADDR holds a NUL byte")?;
    let prefix = if place.agent_store { format!("/worker/attempt_{}", place.attempt) } else { String::new() };
    let prefix = CString::new(prefix).expect("no NUL in a formatted prefix");
    let host_store = i32::from(place.rank == 0 && !place.agent_store);
    // SAFETY: the strings outlive the call; the shim catches C++ exceptions.
    let handle = unsafe {
        ffi::dbt_dist_init(
            host.as_ptr(),
            i32::from(place.master_port),
            place.rank as i32,
            place.world as i32,
            host_store,
            prefix.as_ptr(),
            i32::from(use_nccl),
            0,
            timeout.as_millis() as i64,
        )
    };
    if handle.is_null() {
        anyhow::bail!(
            "rank {} of {} could not join the process group at {}:{}: {}",
            place.rank,
            place.world,
            place.master_addr,
            place.master_port,
            last_error()
        );
    }
    let group = ProcessGroup {
        handle,
        rank: place.rank,
        world: place.world,
        local_rank: place.local_rank,
        device,
        backend: if use_nccl { "nccl" } else { "gloo" },
        timeout,
        barriers: AtomicU64::new(0),
    };
    Ok(Some(GROUP.get_or_init(|| group)))
}

/// Leaves this process only the GPU of its local rank (the `local_rank`-th of
/// `CUDA_VISIBLE_DEVICES`, or of all), which it then sees as `cuda:0`.
fn narrow_visible_gpus(local_rank: usize) {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let chosen = match visible.as_deref().map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>()) {
        Some(list) if !list.is_empty() => list[local_rank % list.len()].to_string(),
        _ => local_rank.to_string(),
    };
    std::env::set_var("CUDA_VISIBLE_DEVICES", chosen);
}

fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated string it owns.
    let text = unsafe { CStr::from_ptr(ffi::dbt_dist_last_error()) }.to_string_lossy().into_owned();
    // c10's messages go on with where they were raised: the first line says what.
    text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").trim_end_matches('.').to_string()
}

impl ProcessGroup {
    /// Why a collective failed, as one sentence: a peer that ended or stopped
    /// answering ends the run on every rank.
    fn failure(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "rank {} of {}: {what} failed, so another rank ended or stopped answering within {} s ({})",
            self.rank,
            self.world,
            self.timeout.as_secs(),
            last_error()
        )
    }

    /// Reduces each tensor in place across the ranks; all start before any is waited for.
    pub fn all_reduce(&self, tensors: &[Tensor], op: Reduce) -> anyhow::Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let ptrs: Vec<*mut torch_sys::C_tensor> = tensors.iter().map(|t| t.as_ptr() as *mut _).collect();
        // SAFETY: the tensors are alive for the call; the shim catches C++ exceptions.
        let rc = unsafe { ffi::dbt_dist_all_reduce(self.handle, ptrs.as_ptr(), ptrs.len(), op as i32) };
        if rc != 0 {
            return Err(self.failure("an all-reduce"));
        }
        Ok(())
    }

    /// Starts reducing `tensor` in place across the ranks and returns at once;
    /// the caller waits through the answer before reading the tensor.
    pub fn start_all_reduce(&'static self, tensor: &Tensor, op: Reduce) -> anyhow::Result<PendingReduce> {
        // SAFETY: the tensor is alive for the call (c10d's work holds it after); the shim catches C++ exceptions.
        let work = unsafe { ffi::dbt_dist_all_reduce_start(self.handle, tensor.as_ptr() as *mut _, op as i32) };
        if work.is_null() {
            return Err(self.failure("starting an all-reduce"));
        }
        Ok(PendingReduce { work, group: self })
    }

    /// The mean over the ranks of a 0-d value (a step's loss), on the caller's device.
    pub fn mean(&self, value: &Tensor) -> anyhow::Result<Tensor> {
        let buffer = value.detach().to_kind(Kind::Float).reshape([1]).to_device(self.device);
        self.all_reduce(std::slice::from_ref(&buffer), Reduce::Sum)?;
        Ok((buffer / self.world as f64).reshape([]).to_device(value.device()))
    }

    /// Every rank's `value`, in rank order, on every rank (each fills its own slot of a sum).
    pub fn gather(&self, value: f64) -> anyhow::Result<Vec<f64>> {
        let mut slots = vec![0.0f64; self.world];
        slots[self.rank] = value;
        let buffer = Tensor::from_slice(&slots).to_device(self.device);
        self.all_reduce(std::slice::from_ref(&buffer), Reduce::Sum)?;
        Ok(Vec::<f64>::try_from(&buffer.to_device(Device::Cpu)).expect("f64 slots"))
    }

    /// Whether any rank says yes (a stop request or signal reaching one rank).
    pub fn any(&self, yes: bool) -> anyhow::Result<bool> {
        Ok(self.any_each([yes])?[0])
    }

    /// [`Group::any`] for several questions in one collective.
    pub fn any_each<const N: usize>(&self, yes: [bool; N]) -> anyhow::Result<[bool; N]> {
        let values: Vec<f32> = yes.iter().map(|&y| f32::from(u8::from(y))).collect();
        let flags = Tensor::from_slice(&values).to_device(self.device);
        self.all_reduce(std::slice::from_ref(&flags), Reduce::Max)?;
        let out = Vec::<f32>::try_from(&flags.to_device(Device::Cpu)).expect("f32 flags");
        Ok(std::array::from_fn(|i| out[i] > 0.0))
    }

    /// Rank `root`'s values, on every rank (in place).
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> anyhow::Result<()> {
        let on_device = tensor.to_device(self.device);
        // SAFETY: the tensor is alive for the call; the shim catches C++ exceptions.
        let rc = unsafe { ffi::dbt_dist_broadcast(self.handle, on_device.as_ptr() as *mut _, root as i32) };
        if rc != 0 {
            return Err(self.failure("a broadcast"));
        }
        if on_device.device() != tensor.device() {
            tensor.shallow_clone().copy_(&on_device);
        }
        Ok(())
    }

    /// Waits for every rank, up to `timeout` (longer than the collectives' own
    /// time-out for work one rank does alone, like making class images).
    pub fn barrier(&self, what: &str, timeout: Duration) -> anyhow::Result<()> {
        let n = self.barriers.fetch_add(1, Ordering::SeqCst);
        let name = CString::new(format!("{n}")).expect("a number has no NUL");
        // SAFETY: the string outlives the call; the shim catches C++ exceptions.
        let rc = unsafe { ffi::dbt_dist_barrier(self.handle, name.as_ptr(), self.world as i32, timeout.as_millis() as i64) };
        if rc != 0 {
            return Err(anyhow::anyhow!(
                "rank {} of {}: waiting for the other ranks ({what}) failed, so another rank ended or stopped answering ({})",
                self.rank,
                self.world,
                last_error()
            ));
        }
        Ok(())
    }
}

/// An all-reduce under way (`ProcessGroup::start_all_reduce`). Dropped
/// unwaited (a failed step), it lets the work finish on its own.
pub struct PendingReduce {
    work: *mut c_void,
    group: &'static ProcessGroup,
}

// SAFETY: c10d's work handles may be waited for from any thread.
unsafe impl Send for PendingReduce {}

impl PendingReduce {
    /// Waits until the reduction is done on this rank.
    pub fn wait(mut self) -> anyhow::Result<()> {
        let work = std::mem::replace(&mut self.work, std::ptr::null_mut());
        // SAFETY: a live handle of the shim, finished once (nulled here, so Drop skips it).
        let rc = unsafe { ffi::dbt_dist_work_finish(work, 1) };
        if rc != 0 {
            return Err(self.group.failure("an all-reduce"));
        }
        Ok(())
    }
}

impl Drop for PendingReduce {
    fn drop(&mut self) {
        if !self.work.is_null() {
            // SAFETY: a live handle of the shim, released without waiting.
            unsafe { ffi::dbt_dist_work_finish(self.work, 0) };
        }
    }
}

/// Makes `grad` the gradient of `param` (a leaf tensor).
pub fn set_grad(param: &Tensor, grad: &Tensor) {
    // SAFETY: both tensors are alive; the shim assigns the grad field.
    unsafe { ffi::dbt_dist_set_grad(param.as_ptr() as *mut _, grad.as_ptr() as *mut _) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn torchrun_variables_make_a_placement() {
        assert_eq!(placement_from(env(&[])).unwrap(), None);
        let p = placement_from(env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank, p.master_port, p.agent_store, p.attempt), (3, 4, 1, 29400, true, 2));
        assert_eq!(p.master_addr, "node0");
    }

    #[test]
    fn bad_torchrun_variables_are_one_sentence() {
        let e = placement_from(env(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let e = placement_from(env(&[("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK is not set"), "{e}");
        let e = placement_from(env(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "99999")])).unwrap_err();
        assert!(e.to_string().contains("not a TCP port"), "{e}");
    }
}

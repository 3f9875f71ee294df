//! Private CPU random generators (PyTorch's own mt19937 generator, through
//! `src/shim/torch_shim.cpp`). A draw equals `torch.randn(shape,
//! generator=torch.Generator("cpu").manual_seed(seed))` bit for bit, and no
//! other draw in the process (another thread, a preview) can shift it. Noise for
//! CUDA work is drawn here and moved, as diffusers does with a CPU generator.

use std::ffi::{c_char, c_void, CStr};

use tch::{Device, Tensor};

mod ffi {
    use super::*;
    extern "C" {
        pub fn dbt_last_error() -> *const c_char;
        pub fn dbt_generator_new(seed: u64) -> *mut c_void;
        pub fn dbt_generator_free(g: *mut c_void);
        pub fn dbt_randn(g: *mut c_void, sizes: *const i64, n: usize) -> *mut torch_sys::C_tensor;
        pub fn dbt_rand(g: *mut c_void, sizes: *const i64, n: usize) -> *mut torch_sys::C_tensor;
        pub fn dbt_randint(g: *mut c_void, low: i64, high: i64, sizes: *const i64, n: usize) -> *mut torch_sys::C_tensor;
        pub fn dbt_randperm(g: *mut c_void, n: i64) -> *mut torch_sys::C_tensor;
        pub fn dbt_generator_get_state(g: *mut c_void) -> *mut torch_sys::C_tensor;
        pub fn dbt_generator_set_state(g: *mut c_void, state: *const torch_sys::C_tensor) -> i32;
        pub fn dbt_grad_reset(t: *mut torch_sys::C_tensor);
    }
}

fn last_error() -> String {
    // SAFETY: the shim keeps a NUL-terminated thread-local buffer.
    unsafe { CStr::from_ptr(ffi::dbt_last_error()) }.to_string_lossy().into_owned()
}

fn wrap(ptr: *mut torch_sys::C_tensor, what: &str) -> anyhow::Result<Tensor> {
    if ptr.is_null() {
        anyhow::bail!("{what} failed in libtorch: {}", last_error());
    }
    // SAFETY: the shim returns a heap `at::Tensor*` that we now own.
    Ok(unsafe { Tensor::from_ptr(ptr) })
}

/// A CPU generator seeded like `torch.Generator("cpu").manual_seed(seed)`.
pub struct CpuRng {
    raw: *mut c_void,
}

// SAFETY: an at::Generator may move between threads; we never share it (&mut for draws).
unsafe impl Send for CpuRng {}

impl CpuRng {
    pub fn new(seed: u64) -> CpuRng {
        // SAFETY: plain constructor; null only if libtorch throws, which it does not for a seed.
        let raw = unsafe { ffi::dbt_generator_new(seed) };
        assert!(!raw.is_null(), "libtorch could not make a CPU generator: {}", last_error());
        CpuRng { raw }
    }

    /// Standard normal float32 on the CPU.
    pub fn randn(&mut self, shape: &[i64]) -> Tensor {
        // SAFETY: the generator is alive; sizes point to `shape.len()` values.
        let ptr = unsafe { ffi::dbt_randn(self.raw, shape.as_ptr(), shape.len()) };
        wrap(ptr, "randn").expect("randn of a valid shape")
    }

    /// Standard normal float32, drawn on the CPU and moved to `device`.
    pub fn randn_on(&mut self, shape: &[i64], device: Device) -> Tensor {
        self.randn(shape).to_device(device)
    }

    /// Uniform [0, 1) float32 on the CPU.
    pub fn rand(&mut self, shape: &[i64]) -> Tensor {
        // SAFETY: as in randn.
        let ptr = unsafe { ffi::dbt_rand(self.raw, shape.as_ptr(), shape.len()) };
        wrap(ptr, "rand").expect("rand of a valid shape")
    }

    /// int64 in [low, high) on the CPU.
    pub fn randint(&mut self, low: i64, high: i64, shape: &[i64]) -> Tensor {
        // SAFETY: as in randn.
        let ptr = unsafe { ffi::dbt_randint(self.raw, low, high, shape.as_ptr(), shape.len()) };
        wrap(ptr, "randint").expect("randint with low < high")
    }

    /// A permutation of 0..n as int64 on the CPU.
    pub fn randperm(&mut self, n: i64) -> Tensor {
        // SAFETY: as in randn.
        let ptr = unsafe { ffi::dbt_randperm(self.raw, n) };
        wrap(ptr, "randperm").expect("randperm of n >= 0")
    }

    /// The generator's full state (a uint8 tensor), for checkpoints.
    pub fn state(&self) -> Tensor {
        // SAFETY: the generator is alive.
        let ptr = unsafe { ffi::dbt_generator_get_state(self.raw) };
        wrap(ptr, "reading the generator state").expect("a CPU generator has a state")
    }

    /// Restores a state from [`state`](Self::state).
    pub fn set_state(&mut self, state: &Tensor) -> anyhow::Result<()> {
        // SAFETY: both pointers are alive for the call.
        let rc = unsafe { ffi::dbt_generator_set_state(self.raw, state.as_ptr()) };
        if rc != 0 {
            anyhow::bail!("the saved random-generator state is not valid: {}", last_error());
        }
        Ok(())
    }
}

impl Drop for CpuRng {
    fn drop(&mut self) {
        // SAFETY: made by dbt_generator_new, freed once.
        unsafe { ffi::dbt_generator_free(self.raw) }
    }
}

/// `param.grad = None`: frees the gradient until the next backward pass.
pub fn set_grad_to_none(param: &Tensor) {
    let mut p = param.shallow_clone();
    // SAFETY: the tensor is alive; the shim only resets its grad field.
    unsafe { ffi::dbt_grad_reset(p.as_mut_ptr()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_generator_equals_a_freshly_seeded_global_one() {
        let mut rng = CpuRng::new(1234);
        let a = rng.randn(&[1, 4, 8, 8]);
        tch::manual_seed(1234);
        let b = Tensor::randn([1, 4, 8, 8], (tch::Kind::Float, Device::Cpu));
        assert!(a.equal(&b));
    }

    #[test]
    fn state_round_trip_reproduces_draws() {
        let mut rng = CpuRng::new(7);
        let _ = rng.randn(&[5]);
        let state = rng.state();
        let first = rng.randn(&[33]);
        let ints = rng.randint(0, 1000, &[4]);
        rng.set_state(&state).unwrap();
        assert!(rng.randn(&[33]).equal(&first));
        assert!(rng.randint(0, 1000, &[4]).equal(&ints));
        assert!(rng.set_state(&Tensor::zeros([3], (tch::Kind::Uint8, Device::Cpu))).is_err());
    }

    #[test]
    fn grad_to_none_undefines_the_gradient() {
        let p = Tensor::ones([3], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * 2.0).sum(tch::Kind::Float).backward();
        assert!(p.grad().defined());
        set_grad_to_none(&p);
        assert!(!p.grad().defined());
        (&p * 3.0).sum(tch::Kind::Float).backward();
        assert_eq!(p.grad().double_value(&[0]), 3.0);
    }
}

//! Gradient averaging across the ranks in buckets, as torch's DDP Reducer does:
//! the trained tensors, in reverse order (the order backward finishes them),
//! grouped into flat buffers of about 25 MB of one dtype and device, each
//! all-reduced as one message; every bucket is started before the first is
//! waited for. A rank whose share of a batch was empty (an epoch's short last
//! batch) has no gradient: it counts as zeros, and a tensor that no rank has a
//! gradient for keeps none, so every rank applies the same update.

use tch::{Kind, Tensor};

use super::group::{set_grad, ProcessGroup, Reduce};

/// torch's DDP default `bucket_cap_mb`.
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The bucket size: `DREAMBOOTH_DIST_BUCKET_MB` (as DDP's `bucket_cap_mb`), else 25 MB.
pub fn bucket_bytes() -> usize {
    let mb = std::env::var("DREAMBOOTH_DIST_BUCKET_MB").ok().and_then(|v| v.parse::<f64>().ok()).filter(|m| *m > 0.0);
    mb.map_or(BUCKET_BYTES, |m| ((m * 1024.0 * 1024.0) as usize).max(1))
}

/// The trained tensors' indices, in reverse, cut into buckets of at most
/// `cap_bytes` (a tensor larger than that is a bucket alone) that never mix
/// dtypes or devices.
pub fn plan_buckets(tensors: &[(Kind, tch::Device, usize)], cap_bytes: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0usize;
    let mut key: Option<(Kind, tch::Device)> = None;
    for i in (0..tensors.len()).rev() {
        let (kind, device, size) = tensors[i];
        let fits = key == Some((kind, device)) && bytes + size <= cap_bytes;
        if !fits || buckets.is_empty() {
            buckets.push(Vec::new());
            bytes = 0;
            key = Some((kind, device));
        }
        buckets.last_mut().expect("a bucket was pushed").push(i);
        bytes += size;
    }
    buckets
}

/// One step's buckets over a parameter list: which tensors train, and how
/// they are grouped. Both ways of averaging (after backward here, during it in
/// overlap.rs) cut, flatten and write back through this, so they agree bit for bit.
pub struct BucketPlan {
    /// The parameter list's indices of the tensors that train, in order.
    pub trained: Vec<usize>,
    /// Positions in `trained`, bucket by bucket, last tensor first.
    pub buckets: Vec<Vec<usize>>,
}

impl BucketPlan {
    /// The buckets of the tensors of `params` that require a gradient now.
    pub fn new(params: &[Tensor], cap_bytes: usize) -> BucketPlan {
        let trained: Vec<usize> = (0..params.len()).filter(|&i| params[i].requires_grad()).collect();
        let shapes: Vec<(Kind, tch::Device, usize)> = trained
            .iter()
            .map(|&i| {
                let p = &params[i];
                (p.kind(), p.device(), p.numel() * p.kind().elt_size_in_bytes())
            })
            .collect();
        BucketPlan { buckets: plan_buckets(&shapes, cap_bytes), trained }
    }

    /// Bucket `b`'s gradients as one flat tensor on `device` (zeros where a tensor has none).
    pub fn flatten(&self, params: &[Tensor], b: usize, device: tch::Device) -> Tensor {
        let parts: Vec<Tensor> = self.buckets[b]
            .iter()
            .map(|&t| {
                let p = &params[self.trained[t]];
                let grad = p.grad();
                if grad.defined() { grad.reshape([-1]) } else { p.zeros_like().reshape([-1]) }
            })
            .collect();
        Tensor::cat(&parts, 0).to_device(device)
    }

    /// 1 for each trained tensor that has a gradient here, else 0: summed over
    /// the ranks, how many hold one.
    pub fn holders(&self, params: &[Tensor], device: tch::Device) -> Tensor {
        let holders: Vec<f32> = self.trained.iter().map(|&i| f32::from(u8::from(params[i].grad().defined()))).collect();
        Tensor::from_slice(&holders).to_device(device)
    }

    /// Makes each trained tensor's gradient its bucket's sum over `world` ranks
    /// divided by `world`; a tensor no rank has a gradient for keeps none.
    pub fn write_back(&self, params: &[Tensor], flats: &[Tensor], holders: &Tensor, world: usize) {
        let holders = Vec::<f32>::try_from(&holders.to_device(tch::Device::Cpu)).expect("f32 holders");
        for (bucket, flat) in self.buckets.iter().zip(flats) {
            let flat = flat.to_device(params[self.trained[bucket[0]]].device()) / world as f64;
            let mut offset = 0i64;
            for &t in bucket {
                let p = &params[self.trained[t]];
                let n = p.numel() as i64;
                let mean = flat.narrow(0, offset, n).view_(p.size());
                offset += n;
                if holders[t] == 0.0 {
                    continue;
                }
                let mut grad = p.grad();
                if grad.defined() {
                    grad.copy_(&mean);
                } else {
                    set_grad(p, &mean.contiguous());
                }
            }
        }
    }
}

/// Replaces each trained tensor's gradient by its mean over the ranks, after
/// the backward pass: every bucket is started, then all are waited for.
pub fn average_gradients(group: &ProcessGroup, params: &[(String, Tensor)]) -> anyhow::Result<()> {
    let params: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
    let plan = BucketPlan::new(&params, bucket_bytes());
    if plan.trained.is_empty() {
        return Ok(());
    }
    let mut flats: Vec<Tensor> = (0..plan.buckets.len()).map(|b| plan.flatten(&params, b, group.device)).collect();
    flats.push(plan.holders(&params, group.device));
    group.all_reduce(&flats, Reduce::Sum)?;
    let holders = flats.pop().expect("holders pushed last");
    plan.write_back(&params, &flats, &holders, group.world);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn buckets_run_in_reverse_and_respect_the_cap_and_dtype() {
        let f = (Kind::Float, Device::Cpu, 10);
        let h = (Kind::Half, Device::Cpu, 10);
        let big = (Kind::Float, Device::Cpu, 100);
        assert_eq!(plan_buckets(&[f, f, f], 20), vec![vec![2, 1], vec![0]]);
        assert_eq!(plan_buckets(&[f, h, f], 100), vec![vec![2], vec![1], vec![0]]);
        assert_eq!(plan_buckets(&[f, big, f], 20), vec![vec![2], vec![1], vec![0]]);
        assert!(plan_buckets(&[], 20).is_empty());
    }
}

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

/// Replaces each trained tensor's gradient by its mean over the ranks.
pub fn average_gradients(group: &ProcessGroup, params: &[(String, Tensor)]) -> anyhow::Result<()> {
    let trained: Vec<&Tensor> = params.iter().map(|(_, p)| p).filter(|p| p.requires_grad()).collect();
    if trained.is_empty() {
        return Ok(());
    }
    let shapes: Vec<(Kind, tch::Device, usize)> =
        trained.iter().map(|p| (p.kind(), p.device(), p.numel() * p.kind().elt_size_in_bytes())).collect();
    let buckets = plan_buckets(&shapes, BUCKET_BYTES);
    // How many ranks hold a gradient for each tensor, reduced along with the buckets.
    let holders: Vec<f32> = trained.iter().map(|p| f32::from(u8::from(p.grad().defined()))).collect();
    let holders = Tensor::from_slice(&holders).to_device(group.device);
    let mut flats: Vec<Tensor> = buckets
        .iter()
        .map(|bucket| {
            let parts: Vec<Tensor> = bucket
                .iter()
                .map(|&i| {
                    let grad = trained[i].grad();
                    if grad.defined() { grad.reshape([-1]) } else { trained[i].zeros_like().reshape([-1]) }
                })
                .collect();
            Tensor::cat(&parts, 0).to_device(group.device)
        })
        .collect();
    flats.push(holders);
    group.all_reduce(&flats, Reduce::Sum)?;
    let holders = flats.pop().expect("holders pushed last");
    let holders = Vec::<f32>::try_from(&holders.to_device(tch::Device::Cpu)).expect("f32 holders");
    for (bucket, flat) in buckets.iter().zip(&flats) {
        let flat = flat.to_device(trained[bucket[0]].device()) / group.world as f64;
        let mut offset = 0i64;
        for &i in bucket {
            let p = trained[i];
            let n = p.numel() as i64;
            let mean = flat.narrow(0, offset, n).view_(p.size());
            offset += n;
            let mut grad = p.grad();
            if holders[i] == 0.0 {
                continue;
            }
            if grad.defined() {
                grad.copy_(&mean);
            } else {
                set_grad(p, &mean.contiguous());
            }
        }
    }
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

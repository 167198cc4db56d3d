//! NCCL collectives on the GPU (feature `nccl`). Rank 0 creates the NCCL
//! unique id and hands it out over the rendezvous link; the communicator
//! runs on candle's stream of this rank's device, so collectives are ordered
//! with the kernels that produce and consume their tensors.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::{Collective, DistEnv, DistError, Result, rendezvous};

/// NCCL handles are plain pointers; one communicator serves one rank, and
/// candle's device is used from the training thread only.
struct SharedComm(Comm);
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

pub struct NcclGroup {
    comm: Arc<SharedComm>,
    device: candle_core::Device,
    rank: usize,
    world_size: usize,
}

fn nccl_err(op: &'static str, e: impl std::fmt::Debug) -> DistError {
    DistError::Collective {
        op,
        reason: format!("{e:?}"),
    }
}

impl NcclGroup {
    pub fn connect(env: &DistEnv, device: &CudaDevice) -> Result<Self> {
        let mut link = rendezvous::connect(env)?;
        let id = if env.rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("create NCCL id", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            link.share_from_root(Some(&bytes))?;
            id
        } else {
            let bytes = link.share_from_root(None)?;
            if bytes.len() != 128 {
                return Err(nccl_err(
                    "receive NCCL id",
                    format!("{} bytes", bytes.len()),
                ));
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(bytes) {
                *d = s as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(device.cuda_stream(), env.rank, env.world_size, id)
            .map_err(|e| nccl_err("init communicator", e))?;
        Ok(Self {
            comm: Arc::new(SharedComm(comm)),
            device: candle_core::Device::Cuda(device.clone()),
            rank: env.rank,
            world_size: env.world_size,
        })
    }
}

/// The collectives as candle custom ops, so they read and write device
/// memory in place of a host round trip.
struct AllReduce(Arc<SharedComm>);
struct Broadcast(Arc<SharedComm>, usize);

fn contiguous_range(l: &Layout, op: &'static str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: tensor must be contiguous")))
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL all-reduce needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = contiguous_range(l, "all-reduce")?;
        let dev = s.device().clone();
        macro_rules! reduce {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(a..b);
                let mut dst = dev.alloc_zeros::<$t>(b - a)?;
                self.0
                    .0
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => reduce!(f32),
            DType::BF16 => reduce!(half::bf16),
            DType::F16 => reduce!(half::f16),
            dt => candle_core::bail!("NCCL all-reduce: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl CustomOp1 for Broadcast {
    fn name(&self) -> &'static str {
        "nccl-broadcast"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL broadcast needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = contiguous_range(l, "broadcast")?;
        let dev = s.device().clone();
        let root = self.1 as i32;
        macro_rules! bcast {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(a..b);
                let mut dst = dev.alloc_zeros::<$t>(b - a)?;
                self.0
                    .0
                    .broadcast(Some(&src), &mut dst, root)
                    .map_err(|e| candle_core::Error::Msg(format!("NCCL broadcast: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => bcast!(f32),
            DType::BF16 => bcast!(half::bf16),
            DType::F16 => bcast!(half::f16),
            dt => candle_core::bail!("NCCL broadcast: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.contiguous()?
            .apply_op1_no_bwd(&AllReduce(self.comm.clone()))?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        Ok(t.contiguous()?
            .apply_op1_no_bwd(&Broadcast(self.comm.clone(), root))?)
    }

    fn barrier(&self) -> Result<()> {
        // A one-element all-reduce read back to the host: returns only when
        // every rank has reached it.
        let one = Tensor::ones(1, DType::F32, &self.device)?;
        self.all_reduce_sum(&one)?.to_vec1::<f32>()?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }
}

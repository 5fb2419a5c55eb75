//! The NCCL transport: one communicator per GPU of this host, the ranks as threads of one
//! process (`ncclCommInitAll`), each rank's collectives enqueued on its device's candle stream so
//! they order with the kernels around them. NVLink multicast (NVLS) is turned off before the
//! communicators are made, as the device machines require.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm as NcclHandle, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::Comm;
use crate::error::{ModelError, Result};

/// A group's communicators: a rank's collective takes its own; an abort drops them all, which
/// aborts what the others wait on.
struct Group {
    devices: Vec<Device>,
    handles: Vec<Mutex<Option<NcclHandle>>>,
    aborted: AtomicBool,
}

/// Communicators joining `devices` (rank r on devices[r]), on their candle streams.
fn join(devices: &[Device]) -> Result<Vec<NcclHandle>> {
    let streams = devices.iter().map(|d| Ok(d.as_cuda_device()?.cuda_stream())).collect::<Result<Vec<_>>>()?;
    NcclHandle::from_devices(streams)
        .map_err(|e| ModelError::input(format!("NCCL could not join GPUs 0..{}: {e:?}", devices.len())))
}

// SAFETY: an NCCL communicator may be called from any thread, one call at a time; each handle
// sits behind its own mutex and is used only by its rank's thread (and dropped by an abort).
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

/// One rank of a group of GPUs (GPU `rank` of this host).
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: Device,
    group: Arc<Group>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {}, {:?})", self.rank, self.world, self.device)
    }
}

impl NcclComm {
    /// The ranks of a group over GPUs 0..world of this host, rank order, each with its device.
    pub fn group(world: usize) -> Result<Vec<(Arc<dyn Comm>, Device)>> {
        if world < 2 {
            return Err(ModelError::input("an NCCL group needs at least two GPUs"));
        }
        // NVLink SHARP/multicast is off on the lent machines; NCCL would otherwise try it.
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        let devices = (0..world)
            .map(|r| Device::new_cuda(r).map_err(|e| ModelError::input(format!("`tp` {world} needs GPU {r}: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        let handles = join(&devices)?;
        let group = Arc::new(Group {
            devices: devices.clone(),
            handles: handles.into_iter().map(|h| Mutex::new(Some(h))).collect(),
            aborted: AtomicBool::new(false),
        });
        Ok(devices
            .into_iter()
            .enumerate()
            .map(|(rank, device)| {
                let comm: Arc<dyn Comm> =
                    Arc::new(NcclComm { rank, world, device: device.clone(), group: group.clone() });
                (comm, device)
            })
            .collect())
    }

    /// Run `op` on this rank's communicator; an error once the group was aborted.
    fn with_handle<T>(&self, op: impl FnOnce(&NcclHandle) -> candle_core::Result<T>) -> candle_core::Result<T> {
        let aborted = || candle_core::Error::Msg(super::PEER_FAILED.into());
        if self.group.aborted.load(Ordering::SeqCst) {
            return Err(aborted());
        }
        let handle = self.group.handles[self.rank].lock().map_err(|_| aborted())?;
        op(handle.as_ref().ok_or_else(aborted)?)
    }

    /// `x` on this rank's GPU, contiguous.
    fn here(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_device(&self.device)?.contiguous()?)
    }

    /// Every rank's `x` (the same shape on every rank) stacked along a new first dimension.
    fn gather_equal(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.here(x)?.apply_op1_no_bwd(&Collective { comm: self, kind: Kind::Gather })?)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Gather,
}

/// A collective as a candle op, so its result is a tensor on the rank's device.
struct Collective<'a> {
    comm: &'a NcclComm,
    kind: Kind,
}

impl Collective<'_> {
    fn run<
        T: CudaDType
            + candle_core::cuda_backend::cudarc::nccl::safe::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    >(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("a collective needs a contiguous tensor".into()))?;
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        let n = end - start;
        let world = self.comm.world;
        let device = storage.device.clone();
        let (len, shape) = match self.kind {
            Kind::Sum => (n, layout.shape().clone()),
            Kind::Gather => {
                let mut dims = vec![world];
                dims.extend_from_slice(layout.dims());
                (n * world, Shape::from(dims))
            }
        };
        // SAFETY: NCCL writes every element of the output before any kernel reads it (both run
        // in order on the device's stream).
        let mut dst: CudaSlice<T> = unsafe { device.alloc::<T>(len)? };
        let nccl = |e| candle_core::Error::Msg(format!("NCCL: {e:?}"));
        self.comm.with_handle(|h| match self.kind {
            Kind::Sum => h.all_reduce(&src, &mut dst, &ReduceOp::Sum).map(|_| ()).map_err(nccl),
            Kind::Gather => h.all_gather(&src, &mut dst).map(|_| ()).map_err(nccl),
        })?;
        Ok((CudaStorage::wrap_cuda_slice(dst, device), shape))
    }
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Sum => "nccl-all-reduce",
            Kind::Gather => "nccl-all-gather",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on GPU tensors")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match storage.dtype() {
            DType::F32 => self.run::<f32>(storage, layout),
            DType::BF16 => self.run::<half::bf16>(storage, layout),
            DType::F16 => self.run::<half::f16>(storage, layout),
            DType::U32 => self.run::<u32>(storage, layout),
            other => candle_core::bail!("NCCL collectives in pare take f32, bf16, f16 or u32, not {other:?}"),
        }
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let sum = self.here(x)?.apply_op1_no_bwd(&Collective { comm: self, kind: Kind::Sum })?;
        Ok(sum.to_device(x.device())?)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        // NCCL gathers equal parts: the ranks' sizes along `dim` first, then every part padded
        // to the largest, gathered, and cut back.
        let size = Tensor::new(&[x.dim(dim)? as u32], &self.device)?;
        let sizes: Vec<u32> = self.gather_equal(&size)?.flatten_all()?.to_vec1()?;
        let longest = sizes.iter().copied().max().unwrap_or(0) as usize;
        let padded = self.here(x)?.pad_with_zeros(dim, 0, longest - x.dim(dim)?)?;
        let all = self.gather_equal(&padded)?;
        let parts = sizes
            .iter()
            .enumerate()
            .map(|(r, &n)| all.get(r)?.narrow(dim, 0, n as usize))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, dim)?.to_device(x.device())?)
    }

    fn abort(&self) {
        self.group.aborted.store(true, Ordering::SeqCst);
        // Dropping a communicator aborts it (ncclCommAbort), and with it what its peers wait on.
        for handle in &self.group.handles {
            if let Ok(mut h) = handle.lock() {
                h.take();
            }
        }
    }

    fn recover(&self) -> Result<()> {
        if !self.group.aborted.load(Ordering::SeqCst) {
            return Ok(());
        }
        // The aborted communicators are gone: the group joins again, with new ones.
        for (slot, handle) in self.group.handles.iter().zip(join(&self.group.devices)?) {
            *slot.lock().map_err(|_| ModelError::input(super::PEER_FAILED))? = Some(handle);
        }
        self.group.aborted.store(false, Ordering::SeqCst);
        Ok(())
    }
}

//! Tensor parallelism: one model over the ranks of a group, Megatron's way. Each rank holds whole
//! query and KV heads (q, k, v split by heads, o by the matching input columns), a block of every
//! MLP's channels (gate and up by rows, down by columns) and a slice of the vocabulary (the
//! embedding's rows, the LM head's outputs). A layer's attention and MLP then each end in one
//! all-reduce of partial sums; the logits are the ranks' vocabulary slices gathered.
//!
//! A split model ([`crate::Model::split`]) is used like the whole one: each forward call runs
//! every rank on the same tokens, one thread each; the collectives hand each rank the same bits,
//! so rank 0's logits are the model's. A rank's KV cache holds its own heads only (a cache of the
//! split model carries every rank's part), so per-head compression needs no communication.
//!
//! [`Comm`] is the seam between the model and a transport; [`LocalComm`] runs a group's ranks as
//! threads of one process over host tensors (what CI checks sharded against unsharded with), and
//! `nccl::NcclComm` (feature `nccl`) runs them over the GPUs of one host.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use candle_core::Tensor;

use crate::error::{ModelError, Result};

#[cfg(feature = "nccl")]
pub mod nccl;

/// The collectives a sharded forward needs, across the ranks of one group. Every rank calls the
/// same collectives in the same order with tensors of the same shape and dtype.
pub trait Comm: fmt::Debug + Send + Sync {
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Every rank's `x` summed, on every rank; each rank gets the same bits.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;

    /// Every rank's `x` concatenated along `dim` in rank order, on every rank (the ranks' sizes
    /// along `dim` may differ).
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor>;

    /// Stop the group: a rank that failed calls this so the others' pending and later
    /// collectives return an error instead of waiting for it forever.
    fn abort(&self);

    /// Make an aborted group usable again. Called on one rank once every rank has stopped (no
    /// collective in flight): one failed call, a request a press refused say, must not end the
    /// model for the calls after it.
    fn recover(&self) -> Result<()>;
}

/// What a sharded model's rank holds of the whole.
#[derive(Debug, Clone)]
pub struct Shard {
    pub comm: Arc<dyn Comm>,
    /// The rows of the vocabulary this rank embeds and scores.
    pub vocab: Range<usize>,
}

impl Shard {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The first of this rank's heads in the whole layer, when it holds `local` of them.
    pub fn head_offset(&self, local: usize) -> usize {
        self.rank() * local
    }
}

/// `rank`'s part of `0..total` when split into `world` contiguous blocks as even as possible
/// (the first `total % world` blocks one longer).
pub fn block(total: usize, world: usize, rank: usize) -> Range<usize> {
    let (base, extra) = (total / world, total % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The in-process transport: a group's ranks are threads of one process and exchange host
/// tensors through shared slots. Every rank sums (or concatenates) the same tensors in rank
/// order, so each gets the same bits.
pub struct LocalComm {
    rank: usize,
    group: Arc<LocalGroup>,
}

struct LocalGroup {
    world: usize,
    state: Mutex<Rendezvous>,
    turn: Condvar,
}

/// One collective at a time: ranks deposit their tensors, the last to arrive publishes them all,
/// and a new round starts only once every rank took the published set.
#[derive(Default)]
struct Rendezvous {
    deposited: Vec<Option<Tensor>>,
    published: Option<Arc<Vec<Tensor>>>,
    /// Ranks that have not yet taken the published set.
    readers: usize,
    round: u64,
    aborted: bool,
}

impl fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalComm(rank {} of {})", self.rank, self.group.world)
    }
}

impl LocalComm {
    /// The ranks of a new group of `world` threads, rank order.
    pub fn group(world: usize) -> Result<Vec<Arc<dyn Comm>>> {
        if world == 0 {
            return Err(ModelError::input("a tensor-parallel group needs at least one rank"));
        }
        let state = Rendezvous { deposited: vec![None; world], ..Rendezvous::default() };
        let group = Arc::new(LocalGroup { world, state: Mutex::new(state), turn: Condvar::new() });
        Ok((0..world).map(|rank| Arc::new(LocalComm { rank, group: group.clone() }) as Arc<dyn Comm>).collect())
    }

    /// Every rank's `x`, in rank order.
    fn exchange(&self, x: &Tensor) -> Result<Arc<Vec<Tensor>>> {
        let aborted = || ModelError::input(PEER_FAILED);
        let group = &self.group;
        let mut state = group.state.lock().map_err(|_| aborted())?;
        // Wait for the previous round's set to be taken by everyone.
        while state.published.is_some() && !state.aborted {
            state = group.turn.wait(state).map_err(|_| aborted())?;
        }
        if state.aborted {
            return Err(aborted());
        }
        state.deposited[self.rank] = Some(x.clone());
        let round = state.round;
        if state.deposited.iter().all(Option::is_some) {
            let all = state.deposited.iter_mut().map(|t| t.take().expect("every rank deposited")).collect();
            state.published = Some(Arc::new(all));
            state.readers = group.world;
            state.round += 1;
            group.turn.notify_all();
        }
        while state.round == round && !state.aborted {
            state = group.turn.wait(state).map_err(|_| aborted())?;
        }
        if state.aborted {
            return Err(aborted());
        }
        let all = state.published.clone().expect("the round's set is published until all took it");
        state.readers -= 1;
        if state.readers == 0 {
            state.published = None;
            group.turn.notify_all();
        }
        Ok(all)
    }
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.exchange(x)?;
        let mut sum = all[0].to_device(x.device())?;
        for t in &all[1..] {
            sum = (sum + t.to_device(x.device())?)?;
        }
        Ok(sum)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let all = self.exchange(x)?;
        let parts = all.iter().map(|t| t.to_device(x.device())).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    fn abort(&self) {
        if let Ok(mut state) = self.group.state.lock() {
            state.aborted = true;
        }
        self.group.turn.notify_all();
    }

    fn recover(&self) -> Result<()> {
        let mut state = self.group.state.lock().map_err(|_| ModelError::input(PEER_FAILED))?;
        let round = state.round;
        *state = Rendezvous { deposited: vec![None; self.group.world], round, ..Rendezvous::default() };
        Ok(())
    }
}

/// What a rank's collective reports when it stops because another rank failed.
const PEER_FAILED: &str = "tensor parallelism: another rank failed";

/// Run `work` on every rank at once, rank r in its own thread with `states[r]`, and return the
/// ranks' results in rank order. A rank that fails aborts the group, so the others stop at their
/// next collective; the failing rank's own error is returned, not its peers' reports that they
/// were stopped.
pub(crate) fn on_every_rank<M: Sync, S: Send, T: Send>(
    ranks: &[M],
    states: Vec<S>,
    comm: impl Fn(&M) -> &Arc<dyn Comm> + Sync,
    work: impl Fn(&M, S) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let results: Vec<Result<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .iter()
            .zip(states)
            .map(|(rank, state)| {
                let (comm, work) = (&comm, &work);
                scope.spawn(move || {
                    let out = work(rank, state);
                    if out.is_err() {
                        comm(rank).abort();
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(ModelError::input("tensor parallelism: a rank panicked"))))
            .collect()
    });
    if results.iter().any(Result::is_err) {
        if let Some(rank) = ranks.first() {
            comm(rank).recover()?;
        }
    }
    let mut first_error: Option<(bool, ModelError)> = None;
    let mut outs = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(v) => outs.push(v),
            Err(e) => {
                let peer = e.to_string().contains(PEER_FAILED);
                if first_error.as_ref().is_none_or(|(p, _)| *p && !peer) {
                    first_error = Some((peer, e));
                }
            }
        }
    }
    match first_error {
        Some((_, e)) => Err(e),
        None => Ok(outs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn blocks_cover_the_range_in_order() {
        let parts: Vec<_> = (0..3).map(|r| block(10, 3, r)).collect();
        assert_eq!(parts, vec![0..4, 4..7, 7..10]);
        assert_eq!(block(8, 2, 1), 4..8);
    }

    #[test]
    fn local_collectives_agree_on_every_rank() {
        let comms = LocalComm::group(3).unwrap();
        let outs = on_every_rank(
            &comms,
            vec![(); 3],
            |c| c,
            |c, ()| -> Result<_> {
                let r = c.rank() as f32;
                let mut sums = Vec::new();
                // Many rounds back to back: no rank may take a later round's set.
                for round in 0..50 {
                    let x = Tensor::new(&[r + round as f32, 10.0 * r], &Device::Cpu)?;
                    sums.push(c.all_reduce_sum(&x)?.to_vec1::<f32>()?);
                }
                let gathered = c.all_gather(&Tensor::new(&[r; 2], &Device::Cpu)?.reshape((1, 2))?, 0)?;
                Ok((sums, gathered.to_vec2::<f32>()?))
            },
        )
        .unwrap();
        for (sums, gathered) in &outs {
            for (round, s) in sums.iter().enumerate() {
                assert_eq!(s, &vec![3.0 + 3.0 * round as f32, 30.0]);
            }
            assert_eq!(gathered, &vec![vec![0.0; 2], vec![1.0; 2], vec![2.0; 2]]);
        }
    }

    #[test]
    fn a_failing_rank_stops_the_group_with_its_own_error_and_the_group_recovers() {
        let comms = LocalComm::group(2).unwrap();
        let sum = |fail: bool| {
            on_every_rank(
                &comms,
                vec![(); 2],
                |c| c,
                |c, ()| {
                    if fail && c.rank() == 1 {
                        return Err(ModelError::input("rank 1 broke"));
                    }
                    Ok(c.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?)?.to_vec1::<f32>()?)
                },
            )
        };
        assert_eq!(sum(true).unwrap_err().to_string(), "rank 1 broke");
        assert_eq!(sum(false).unwrap(), vec![vec![2.0], vec![2.0]]);
    }
}

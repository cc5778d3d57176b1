//! The ranks of a data-parallel run. A process started by `mpirun -np N` (OpenMPI, MPICH:
//! the launcher sets the world size in the environment) is one of N ranks; each reads its
//! shard of every global batch, and the trainable tensors' gradients are summed across
//! ranks once per step. Built without the `mpi` feature, or started without a launcher,
//! the process is the only rank and every collective is the identity.

use anyhow::Result;

/// The world of ranks this process belongs to.
pub struct Comm {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<mpi_world::World>,
}

/// The world size the launcher announced in the environment, if any.
fn launcher_size() -> Option<(usize, &'static str)> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .into_iter()
        .find_map(|k| Some((std::env::var(k).ok()?.parse().ok()?, k)))
}

impl Comm {
    /// A world of one: this process alone.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// The world the launcher started this process in (MPI is initialised only then).
    pub fn from_launcher() -> Result<Self> {
        let Some((n, var)) = launcher_size().filter(|(n, _)| *n > 1) else {
            return Ok(Self::single());
        };
        #[cfg(feature = "mpi")]
        {
            let _ = (n, var);
            let w = mpi_world::World::init()?;
            Ok(Self {
                rank: w.rank(),
                size: w.size(),
                mpi: Some(w),
            })
        }
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "started by an MPI launcher with {n} ranks ({var}), but this binary was built without the `mpi` feature (see the README, \"Training on several processes or machines\")"
        )
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the one that writes a run's files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Element-wise sum over the ranks, in place (every rank gets the same result).
    pub fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.mpi {
            return w.sum_f32(buf);
        }
        let _ = buf;
        Ok(())
    }

    /// Element-wise sum over the ranks, in place, in f64.
    pub fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.mpi {
            return w.sum_f64(buf);
        }
        let _ = buf;
        Ok(())
    }

    /// Ends every rank at once after an error on this one (MPI_Abort): the others would
    /// otherwise wait in their next collective forever.
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.mpi {
            w.abort(code);
        }
        let _ = code;
    }
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use anyhow::{Result, anyhow, bail};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    pub struct World {
        // dropped last: finalises MPI
        _universe: Universe,
        world: SimpleCommunicator,
    }

    impl World {
        pub fn init() -> Result<Self> {
            let universe =
                mpi::initialize().ok_or_else(|| anyhow!("MPI could not be initialised"))?;
            let world = universe.world();
            Ok(Self {
                world,
                _universe: universe,
            })
        }

        pub fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        pub fn size(&self) -> usize {
            self.world.size() as usize
        }

        fn check_len(n: usize) -> Result<()> {
            if n > i32::MAX as usize {
                bail!("all-reduce of {n} values: more than MPI's count limit");
            }
            Ok(())
        }

        pub fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            Self::check_len(buf.len())?;
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }

        pub fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            Self::check_len(buf.len())?;
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }

        pub fn abort(&self, code: i32) {
            self.world.abort(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_world_is_the_identity() {
        let c = Comm::single();
        assert_eq!((c.rank(), c.size(), c.is_root()), (0, 1, true));
        let mut v = vec![1.5f32, -2.0];
        c.sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
    }
}

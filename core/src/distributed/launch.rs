//! Where this process stands in a multi-process launch, from the launcher's environment:
//! torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), SLURM's srun
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) or OpenMPI's mpirun
//! (`OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`). None set is one process, world 1.
//!
//! Under srun and mpirun the rendezvous address is not in the environment as torchrun puts
//! it: `MASTER_ADDR` (default `127.0.0.1`) and `MASTER_PORT` (default 29500, torchrun's)
//! must be exported by the job script, as for torch.distributed's `env://`.

use anyhow::{bail, Context, Result};

/// torchrun's default rendezvous port.
pub const DEFAULT_PORT: u16 = 29500;

/// This process's place in the launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this machine: which GPU it takes (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// The rendezvous (TCPStore) address and port.
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's elastic agent serves the store (`TORCHELASTIC_USE_AGENT_STORE=True`): every
    /// rank, rank 0 too, connects to it as a client.
    pub agent_store: bool,
    /// Which launcher's variables were read, for messages.
    pub launcher: &'static str,
}

impl Launch {
    /// One process: what medssl does when no launcher's variables are set.
    pub fn single() -> Launch {
        Launch {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_PORT,
            agent_store: false,
            launcher: "none",
        }
    }

    /// Reads the launch from the process environment.
    pub fn from_env() -> Result<Launch> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the launch from `var` (the environment, or a table in tests). torchrun's
    /// variables win over SLURM's, which win over OpenMPI's: torchrun run inside an srun job
    /// sets its own.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Launch> {
        let launchers: [(&'static str, [&str; 3]); 3] = [
            ("torchrun", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
            ("srun", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]),
            (
                "mpirun",
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                ],
            ),
        ];
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("environment variable {name}={v:?} is not a non-negative integer"))
                })
                .transpose()
        };
        for (launcher, [rank, size, local]) in launchers {
            let (Some(r), Some(w)) = (number(rank)?, number(size)?) else {
                continue;
            };
            if w == 0 || r >= w {
                bail!("{launcher}'s {rank}={r} and {size}={w}: expected a rank below a world size of at least 1");
            }
            let master_port = match var("MASTER_PORT") {
                Some(p) => p
                    .trim()
                    .parse::<u16>()
                    .with_context(|| format!("environment variable MASTER_PORT={p:?} is not a port number"))?,
                None => DEFAULT_PORT,
            };
            return Ok(Launch {
                rank: r,
                world_size: w,
                local_rank: number(local)?.unwrap_or(0),
                master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port,
                agent_store: launcher == "torchrun"
                    && var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")),
                launcher,
            });
        }
        Ok(Launch::single())
    }

    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        let table: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|name| table.get(name).cloned())
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(launch(&[]).unwrap(), Launch::single());
    }

    #[test]
    fn torchrun_with_its_agent_store() {
        let l = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (3, 4, 1));
        assert_eq!(
            (l.master_addr.as_str(), l.master_port, l.agent_store),
            ("node0", 1234, true)
        );
        assert_eq!(l.launcher, "torchrun");
    }

    #[test]
    fn slurm_and_openmpi_with_the_default_rendezvous() {
        let l = launch(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")]).unwrap();
        assert_eq!(
            (l.rank, l.world_size, l.launcher, l.master_port),
            (1, 2, "srun", DEFAULT_PORT)
        );
        assert!(!l.agent_store);
        let l = launch(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "3")]).unwrap();
        assert_eq!((l.rank, l.world_size, l.launcher), (0, 3, "mpirun"));
        // torchrun inside an srun job: torchrun's variables are this process's.
        let l = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.launcher), (1, 2, "torchrun"));
    }

    #[test]
    fn bad_values_are_named() {
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK=2") && e.contains("WORLD_SIZE=2"), "{e}");
        let e = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
    }
}

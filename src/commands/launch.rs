//! `rae-cache launch`: start one process per GPU of this machine with the
//! torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT), for machines without torchrun. If one process fails the
//! others are stopped and its exit code is returned.

use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Processes (GPUs) on this machine.
    #[arg(long)]
    nproc_per_node: usize,
    /// Machines in the job.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This machine's index (0-based).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of the machine that runs rank 0.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// The rae-cache command each process runs, after `--`
    /// (e.g. `-- train --data ... --out ...`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.nproc_per_node == 0 || a.nnodes == 0 || a.node_rank >= a.nnodes {
        bail!(
            "--nproc-per-node {} --nnodes {} --node-rank {} is not a valid layout",
            a.nproc_per_node,
            a.nnodes,
            a.node_rank
        );
    }
    let exe = std::env::current_exe().context("locating the rae-cache binary")?;
    let world = a.nproc_per_node * a.nnodes;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..a.nproc_per_node {
        let rank = a.node_rank * a.nproc_per_node + local;
        let child = Command::new(&exe)
            .args(&a.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc_per_node.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", a.master_port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push((rank, child));
    }
    // Poll, so that the first failure stops the rest at once instead of
    // leaving them waiting on a collective forever.
    let mut failed: Option<(usize, i32)> = None;
    while !children.is_empty() && failed.is_none() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(st)) => {
                    let (rank, _) = children.swap_remove(i);
                    if !st.success() {
                        failed = Some((rank, st.code().unwrap_or(1)));
                        break;
                    }
                }
                Ok(None) => i += 1,
                Err(e) => return Err(e).context("waiting for the ranks"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some((rank, code)) = failed {
        for (_, c) in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        eprintln!("error: rank {rank} exited with status {code}; stopped the other ranks");
        return Ok(ExitCode::from(code.clamp(1, 255) as u8));
    }
    Ok(ExitCode::SUCCESS)
}

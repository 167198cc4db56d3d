//! One file per subcommand: parse arguments, call the library, report.
//! Each exposes `Args` (clap) and `run(Args) -> anyhow::Result<ExitCode>`.

pub mod bench;
pub mod build;
pub mod decode;
pub mod demo;
pub mod eval;
pub mod eval_recon;
pub mod eval_ref;
pub mod inspect;
pub mod launch;
pub mod merge;
pub mod progress;
pub mod run_dir;
pub mod sample;
pub mod train;
pub mod train_decoder;
pub mod verify;

use rae_cache::precision::Precision;

/// Where and in what precision a model runs (`sample`, `decode`).
#[derive(clap::Args, Debug)]
pub struct ComputeArgs {
    /// cpu | cuda | cuda:N | auto (in a data-parallel job: cuda:LOCAL_RANK).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Model compute precision: auto (bf16 on CUDA, f32 on CPU), f32, bf16
    /// or f16. Sampler state, time embedding, norms, softmax and pixels
    /// stay f32.
    #[arg(long, default_value = "auto")]
    pub precision: Precision,
    /// Allow TF32 tensor-core math in f32 matrix products (CUDA only; a
    /// no-op on the CPU).
    #[arg(long)]
    pub tf32: bool,
}

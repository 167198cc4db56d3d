//! One file per subcommand: parse arguments, call the library, report.
//! Each exposes `Args` (clap) and `run(Args) -> anyhow::Result<ExitCode>`.

pub mod bench;
pub mod build;
pub mod decode;
pub mod inspect;
pub mod launch;
pub mod merge;
pub mod progress;
pub mod sample;
pub mod train;
pub mod train_decoder;
pub mod verify;

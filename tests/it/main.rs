//! The integration tests: one test binary (`cargo test --test it`), so
//! candle and parquet are linked once, not once per test file. Each file of
//! this directory is a module; `common` holds the shared harness (the binary
//! under test, the reference fixtures, tolerances, a tiny latent cache).
//!
//! Run one file's tests with its module path as the filter, e.g.
//! `cargo test --test it parity_models::`.

mod common;
// Random-weight models shared with the benches (the ignored throughput checks).
#[allow(dead_code, unused_imports)]
#[path = "../../benches/support/mod.rs"]
mod bench_support;

mod arrow_readers;
mod build_bad_inputs;
mod build_e2e;
mod build_resume;
mod build_sources;
mod cli_bench;
mod cli_sample_decode;
mod demo;
mod eval;
mod eval_decoded;
mod eval_metrics;
mod eval_recon;
mod features;
mod gradients;
mod images_decode;
mod loader;
mod optim;
mod parity_crop;
mod parity_encoders;
mod parity_models;
mod parity_sampler;
mod shards;
mod stage1_disc;
mod stage1_gen;
mod store_s3;
mod train_decoder_e2e;
mod train_decoder_gan;
mod train_decoder_online;
mod train_e2e;
mod weights;

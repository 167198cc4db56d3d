//! rae-cache: pre-encode image datasets through a frozen representation
//! encoder into Parquet latent shards, train DiT-DH from them, sample and
//! decode. See README.md and docs/DESIGN.md for the data flow.

#![warn(missing_docs)]

pub mod demo;
pub mod device;
pub mod diffusion;
pub mod disc;
pub mod dist;
pub mod encoders;
pub mod error;
pub mod eval;
pub mod features;
pub mod fsutil;
pub mod generate;
pub mod images;
pub mod memory;
pub mod models;
pub mod pipeline;
pub mod precision;
pub mod progress;
pub mod shards;
pub mod sources;
pub mod stage1;
pub mod store;
#[cfg(test)]
mod test_util;
// docs pending: src/train is being edited on the lead's branch
#[allow(missing_docs)]
pub mod train;
pub mod weights;

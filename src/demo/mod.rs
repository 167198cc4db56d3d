//! `rae-cache demo`: the pieces of the whole-pipeline demo that are not
//! subcommands of their own. The demo runs ordinary subcommands (build,
//! train-decoder, train, sample, decode, eval); this module makes its input
//! images ([`shapes`]) and its page ([`report`]).

pub mod report;
pub mod shapes;

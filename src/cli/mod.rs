//! The command line, one file per command group: argument structs and printing; the work is in
//! the library.

pub mod data;
pub mod demo;
pub mod model;
pub mod ops;
pub mod progress;
pub mod rehearse;
pub mod run;
pub mod sync;

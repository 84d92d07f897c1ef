//! Metrics and calibration for OOD scores (ID is the positive class, higher = more ID).

pub mod bootstrap;
pub mod calibrate;
pub mod metrics;

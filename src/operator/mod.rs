//! The thin cluster operator: it decides how many warm sandboxes each node keeps per pool and
//! never touches the hot path.
//!
//! - [`planner`]: the quota planner, a pure function;
//! - the controllers follow.

pub mod planner;

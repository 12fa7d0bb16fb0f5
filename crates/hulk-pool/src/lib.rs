//! The warm pool engine of hulk-vpc: pre-allocated VPC addresses per
//! (subnet, security groups, QoS) so that a pod never waits for the cloud.
//!
//! The crate holds its place in the workspace layout and exports nothing
//! yet; the engine is tracked in the project's issues.

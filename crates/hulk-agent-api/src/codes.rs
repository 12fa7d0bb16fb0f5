//! hulk-vpc's own CNI error codes. The CNI specification leaves codes 100
//! and above to each plugin; these are hulk-vpc's, as
//! [`ErrorCode::Other`] values so they can be compared and matched.
//!
//! | code | meaning | what the operator does |
//! |------|---------|------------------------|
//! | 100  | internal error (a bug) | report it with the agent and plugin logs |
//! | 101  | the IPAM backend refused or failed the request | read `details`; see the backend's logs |
//! | 102  | the subnet or quota is exhausted | grow the subnet or quota, or move pods |
//! | 103  | the node agent could not be reached | check the agent DaemonSet and its socket |
//! | 104  | netlink / datapath configuration failed | `hulkctl node`, kernel log |
//! | 105  | the pod's network namespace could not be entered | the runtime removed it; retry the pod |
//! | 106  | the node state store failed | check the agent's state directory and disk |
//!
//! A panic caught by the plugin's skeleton is the spec crate's
//! [`ErrorCode::Internal`] (999, libcni's own internal error).

use hulk_cni::ErrorCode;
use hulk_ipam::IpamError;

/// 100: an internal error of the agent or plugin (a bug).
pub const INTERNAL: ErrorCode = ErrorCode::Other(100);
/// 101: the IPAM backend refused or failed the request.
pub const IPAM_BACKEND: ErrorCode = ErrorCode::Other(101);
/// 102: no address left in the subnet or quota.
pub const ADDRESS_EXHAUSTED: ErrorCode = ErrorCode::Other(102);
/// 103: the node agent could not be reached.
pub const AGENT_UNAVAILABLE: ErrorCode = ErrorCode::Other(103);
/// 104: configuring the datapath (netlink) failed.
pub const DATAPATH: ErrorCode = ErrorCode::Other(104);
/// 105: the pod network namespace could not be opened or entered.
pub const NAMESPACE: ErrorCode = ErrorCode::Other(105);
/// 106: the node's state store failed.
pub const STATE_STORE: ErrorCode = ErrorCode::Other(106);

/// The code of an IPAM backend's failure, wherever it surfaces (the
/// agent's pools, the plugin's dry run): the pod's own request (its fixed
/// address) is 7, an exhausted subnet or quota 102, a failure that heals
/// by retrying (the cloud throttles, times out, is down) 11, any other
/// refusal 101.
pub fn of_ipam_error(error: &IpamError) -> ErrorCode {
    match error {
        IpamError::InvalidRequest(_) => ErrorCode::InvalidNetworkConfig,
        IpamError::Exhausted { .. } | IpamError::Quota(_) => ADDRESS_EXHAUSTED,
        error if error.is_retryable() => ErrorCode::TryAgainLater,
        _ => IPAM_BACKEND,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_numbers_and_survive_the_wire() {
        let codes = [
            (INTERNAL, 100),
            (IPAM_BACKEND, 101),
            (ADDRESS_EXHAUSTED, 102),
            (AGENT_UNAVAILABLE, 103),
            (DATAPATH, 104),
            (NAMESPACE, 105),
            (STATE_STORE, 106),
        ];
        for (code, number) in codes {
            assert_eq!(code.as_u32(), number);
            assert_eq!(ErrorCode::from_u32(number), code);
        }
    }
}

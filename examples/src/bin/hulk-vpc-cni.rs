//! The hulk-vpc CNI plugin binary: the CNI skeleton running
//! [`hulk_plugin::VpcPlugin`].

use std::process::ExitCode;

fn main() -> ExitCode {
    hulk_cni::run(hulk_plugin::VpcPlugin)
}

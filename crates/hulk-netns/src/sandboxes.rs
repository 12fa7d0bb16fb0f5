//! The node's sandbox namespaces as the kernel shows them, and which pod
//! addresses their interfaces hold: the kernel's word on whether an
//! address is in use, for addresses the node has no record of (a lost
//! state file, a replacement node adopting a predecessor's addresses).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use nix::errno::Errno;

use crate::attach::{Datapath, DatapathError};
use crate::kernel::{Kernel, KernelError};

/// Whether `error` says a listed namespace or link went away before it was
/// read (its sandbox or process ended meanwhile), or what is at the path
/// is no network namespace after all: either way it holds no address.
fn gone_meanwhile(error: &KernelError) -> bool {
    matches!(
        error,
        KernelError::NamespaceNotFound(_)
            | KernelError::NotANamespace { .. }
            | KernelError::LinkNotFound(_)
    ) || error.raw_os_error() == Some(Errno::ESRCH as i32)
}

impl<K: Kernel> Datapath<K> {
    /// Which of `addresses` an interface (up or down, of any kind) holds
    /// in some sandbox namespace of the node ([`Kernel::sandbox_namespaces`]),
    /// each with the path of the first namespace found holding it; an
    /// address absent from the answer is held by no interface outside the
    /// node's own namespaces. Nothing is listed or opened when `addresses`
    /// is empty.
    ///
    /// A namespace or link that vanishes while it is read is skipped.
    /// Any other failure (the listing, a namespace that cannot be entered,
    /// links or addresses that cannot be read) is an error rather than a
    /// partial answer: the caller must not take an address for unused
    /// because a namespace could not be looked into.
    pub async fn sandbox_holders(
        &self,
        addresses: &[IpAddr],
    ) -> Result<BTreeMap<IpAddr, PathBuf>, DatapathError> {
        let mut wanted: BTreeSet<IpAddr> = addresses.iter().copied().collect();
        let mut holders = BTreeMap::new();
        if wanted.is_empty() {
            return Ok(holders);
        }
        let kernel = self.kernel();
        for path in kernel
            .sandbox_namespaces()
            .await
            .map_err(DatapathError::Kernel)?
        {
            let ns = match kernel.open(&path).await {
                Ok(ns) => ns,
                Err(error) if gone_meanwhile(&error) => continue,
                Err(error) => return Err(DatapathError::Kernel(error)),
            };
            let links = match kernel.links(&ns).await {
                Ok(links) => links,
                Err(error) if gone_meanwhile(&error) => continue,
                Err(error) => return Err(DatapathError::Kernel(error)),
            };
            for link in links {
                let held = match kernel.addresses(&ns, &link.name).await {
                    Ok(held) => held,
                    Err(error) if gone_meanwhile(&error) => continue,
                    Err(error) => return Err(DatapathError::Kernel(error)),
                };
                for address in held {
                    if wanted.remove(&address.addr()) {
                        holders.insert(address.addr(), path.clone());
                    }
                }
            }
            if wanted.is_empty() {
                break;
            }
        }
        Ok(holders)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::fake::FakeKernel;
    use crate::kernel::SlaveKind;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test]
    async fn addresses_are_found_in_sandboxes_never_in_the_host() {
        let kernel = FakeKernel::new();
        kernel.add_parent("eth1", 1500);
        let pod = kernel.add_namespace("/run/netns/pod");
        kernel
            .create_slave("eth1", "eth0", SlaveKind::default(), &pod)
            .await
            .unwrap();
        kernel
            .add_address(&pod, "eth0", "10.20.0.5/24".parse().unwrap())
            .await
            .unwrap();
        // The same address on the host is the node's, not a sandbox's.
        let host = *kernel.host();
        kernel
            .add_address(&host, "eth1", "10.20.0.6/24".parse().unwrap())
            .await
            .unwrap();
        let datapath = Datapath::new(kernel);
        let holders = datapath
            .sandbox_holders(&[ip("10.20.0.5"), ip("10.20.0.6"), ip("10.20.0.7")])
            .await
            .unwrap();
        assert_eq!(
            holders,
            BTreeMap::from([(ip("10.20.0.5"), PathBuf::from("/run/netns/pod"))])
        );

        datapath
            .kernel()
            .remove_namespace(Path::new("/run/netns/pod"));
        assert!(
            datapath
                .sandbox_holders(&[ip("10.20.0.5")])
                .await
                .unwrap()
                .is_empty(),
            "a namespace no path reaches is not listed"
        );
    }

    #[tokio::test]
    async fn a_failed_listing_is_an_error_not_an_empty_answer() {
        let kernel = FakeKernel::new();
        kernel.fail_namespace_listing(true);
        let datapath = Datapath::new(kernel);
        assert!(datapath.sandbox_holders(&[]).await.unwrap().is_empty());
        assert!(datapath.sandbox_holders(&[ip("10.20.0.5")]).await.is_err());
    }
}

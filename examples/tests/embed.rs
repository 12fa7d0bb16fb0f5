//! The embedding example end to end on the host kernel (macvlan; the VM
//! runs it with ipvlan): every function gets an address, and nothing is
//! left behind. Root; nextest group `netns`.

use std::process::Command;

#[test]
fn functions_get_vpc_addresses_and_leave_nothing_behind() {
    let output = Command::new(env!("CARGO_BIN_EXE_hulk-embed"))
        .args([
            "--kind",
            "macvlan",
            "--functions",
            "6",
            "--subnet",
            "10.78.0.0/24",
        ])
        .output()
        .expect("hulk-embed runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Four warm addresses, then the refiller's; released ones cool down
    // before reuse, so each function gets a new one.
    for number in 0..6 {
        let address = format!("10.78.0.{}", number + 2);
        let line = format!("function {number}: {address}/24 on eth0");
        assert!(stdout.contains(&line), "missing {line:?} in {stdout}");
        let listening = format!("listening on {address}:");
        assert!(stdout.contains(&listening), "{stdout}");
    }
    assert!(stdout.contains("done: 0 assigned"), "{stdout}");
    let namespaces = (0..6)
        .map(|number| format!("hulk-fn-{number}"))
        .chain(["hulk-embed-node".to_owned()]);
    for name in namespaces {
        let path = std::path::Path::new("/run/netns").join(&name);
        assert!(!path.exists(), "{name} left behind");
    }
}

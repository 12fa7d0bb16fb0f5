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
    // Four warm addresses, then the refiller's: each function a new one
    // (released ones cool down before reuse).
    for (number, address) in [
        "10.78.0.2",
        "10.78.0.3",
        "10.78.0.4",
        "10.78.0.5",
        "10.78.0.6",
        "10.78.0.7",
    ]
    .iter()
    .enumerate()
    {
        let line = format!("function {number}: {address}/24 on eth0");
        assert!(stdout.contains(&line), "missing {line:?} in {stdout}");
        assert!(
            stdout.contains(&format!("listening on {address}:")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("done: 1 idle, 3 cooling down, 0 assigned"),
        "{stdout}"
    );
    for name in ["hulk-fn-0", "hulk-fn-1", "hulk-fn-2", "hulk-embed-node"] {
        assert!(
            !std::path::Path::new("/run/netns").join(name).exists(),
            "{name} left behind"
        );
    }
}

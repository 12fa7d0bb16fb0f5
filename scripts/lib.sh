# shellcheck shell=bash
# Shared by scripts/vm-tests, scripts/vm-bench and scripts/demo; source it
# from the checkout's root. Sets target (below).

# Prints the executables cargo builds for the given `cargo test`/`cargo bench`
# arguments (with --no-run), one per line.
cargo_executables() {
    cargo "$@" --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["target"]["kind"] in (["test"], ["bench"]):
        print(message["executable"])
'
}

# Cargo's target directory, absolute: target/ in the checkout unless
# CARGO_TARGET_DIR or cargo's configuration says otherwise.
target=$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# Runs vm/run-in-vm.sh with what the VPC topology needs: a bridge as the
# subnet, iptables (nft backend) standing in for kube-proxy, and the
# reference CNI plugins for comparison. Arguments: extra options, then
# `--` and the binaries.
run_in_vpc_vm() {
    vm/run-in-vm.sh \
        --module bridge --module crc32c_generic --module nf_tables --module nft_compat \
        --module nft_chain_nat --module xt_nat --module xt_MASQUERADE --module xt_tcpudp \
        --tool /usr/sbin/ip --tool /usr/sbin/iptables \
        --file /usr/lib/x86_64-linux-gnu/xtables:/usr/lib/x86_64-linux-gnu/xtables \
        --file /usr/lib/cni:/usr/lib/cni \
        --file /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt \
        "$@"
}

# Prints the --file options (one per line) that put the node's programs,
# stripped, into the VM at their host paths in $target/PROFILE (debug or
# release): the e2e tests exec them there (CARGO_BIN_EXE_*).
node_program_files() {
    local program profile_dir=$target/$1
    for program in hulk-agent hulk-vpc-cni hulkctl hulk-ultron-fake; do
        printf '%s\n' --file "$(stripped "$profile_dir/$program"):$profile_dir/"
    done
}

# Copies each binary without its debug info (a tenth of the size, so the
# VM's initramfs stays small) to $target/vm/ and prints the copies' paths.
stripped() {
    local binary directory=$target/vm
    mkdir -p "$directory"
    for binary in "$@"; do
        objcopy --strip-debug "$binary" "$directory/${binary##*/}"
        echo "$directory/${binary##*/}"
    done
}

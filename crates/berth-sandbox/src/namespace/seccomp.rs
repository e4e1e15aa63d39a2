//! The sandbox's seccomp profile: allow by default, deny a list of syscalls that give
//! access to kernel facilities a coding agent never needs (in the spirit of Docker's
//! default profile, which is an allowlist; ours is a denylist — see the crate README).

use serde_json::{json, Value};

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// Denied outright with `EPERM`.
const DENIED: &[&str] = &[
    // kernel keyring
    "add_key",
    "keyctl",
    "request_key",
    // kernel programs and tracing of the whole system
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    // replacing or configuring the kernel
    "kexec_file_load",
    "kexec_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "iopl",
    "ioperm",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "nfsservctl",
    // clocks are host-wide
    "clock_adjtime",
    "clock_settime",
    "settimeofday",
    "adjtimex",
    "stime",
    // the mount table and namespaces
    "mount",
    "mount_setattr",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "setns",
    "unshare",
    // file handles bypass path-based checks
    "name_to_handle_at",
    "open_by_handle_at",
    // page-fault handling races are a favourite exploit primitive
    "userfaultfd",
    // NUMA and memory policy of other processes
    "move_pages",
    "migrate_pages",
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "vm86",
    "vm86old",
];

/// `clone` flags that create namespaces (`CLONE_NEWTIME`, `NEWNS`, `NEWCGROUP`, `NEWUTS`,
/// `NEWIPC`, `NEWUSER`, `NEWPID`, `NEWNET`).
const CLONE_NS_FLAGS: &[u64] = &[
    0x80,
    0x20000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

/// `personality` flags Docker's profile refuses: `READ_IMPLIES_EXEC`, `MMAP_PAGE_ZERO`,
/// `ADDR_NO_RANDOMIZE`, `ADDR_COMPAT_LAYOUT`, `ADDR_LIMIT_3GB`.
const PERSONALITY_FLAGS: &[u64] = &[
    0x0040_0000,
    0x0010_0000,
    0x0004_0000,
    0x0020_0000,
    0x0800_0000,
];

fn architectures() -> Value {
    if cfg!(target_arch = "aarch64") {
        json!(["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"])
    } else {
        json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
    }
}

fn masked_eq_rules(name: &str, flags: &[u64], extra: Option<Value>) -> Vec<Value> {
    flags
        .iter()
        .map(|flag| {
            let mut args = vec![
                json!({"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}),
            ];
            if let Some(extra) = &extra {
                args.push(extra.clone());
            }
            json!({
                "names": [name],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": args,
            })
        })
        .collect()
}

/// The OCI `linux.seccomp` object.
pub fn profile() -> Value {
    let mut syscalls = vec![
        json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
        // clone3 passes its flags in memory seccomp cannot inspect; ENOSYS makes libc
        // fall back to clone, whose flags are checked below (Docker does the same).
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    syscalls.extend(masked_eq_rules("clone", CLONE_NS_FLAGS, None));
    // personality(0xffffffff) only queries the current persona; allow it.
    let not_query = json!({"index": 0, "value": 0xffff_ffffu64, "op": "SCMP_CMP_NE"});
    syscalls.extend(masked_eq_rules(
        "personality",
        PERSONALITY_FLAGS,
        Some(not_query),
    ));
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": architectures(),
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_parses_as_oci() {
        let seccomp: oci_spec::runtime::LinuxSeccomp =
            serde_json::from_value(profile()).expect("valid OCI seccomp");
        let syscalls = seccomp.syscalls().as_ref().expect("syscalls");
        let denied = &syscalls[0];
        for name in ["unshare", "setns", "mount", "bpf", "keyctl", "userfaultfd"] {
            assert!(denied.names().iter().any(|n| n == name), "{name}");
        }
        assert!(!denied.names().iter().any(|n| n == "ptrace"));
        assert_eq!(
            syscalls.iter().filter(|s| s.names()[0] == "clone").count(),
            CLONE_NS_FLAGS.len()
        );
    }
}

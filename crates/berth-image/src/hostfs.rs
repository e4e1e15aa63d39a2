//! What of the host a `host` image shows, and which of its files are secrets. Shared by
//! the namespace driver's `host` image (bind mounts with masks) and the microVM
//! rootfs built `--from host` (a copy with the same masks), so both hide the same.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Host system directories a `host` image exposes (read-only) or replicates (when
/// they are symlinks, as `/bin -> usr/bin` on merged-/usr systems).
pub const HOST_SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc",
];

/// Files under the host's `/etc` that hold secrets on common systems.
const ETC_SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssl/private",
    "/etc/security/opasswd",
    "/etc/krb5.keytab",
    "/etc/NetworkManager/system-connections",
    "/etc/wpa_supplicant",
    "/etc/ppp/chap-secrets",
    "/etc/ppp/pap-secrets",
    "/etc/ipsec.secrets",
    "/etc/docker/key.json",
    "/etc/pki/tls/private",
];

/// Secrets under `/etc` to mask: the well-known list, ssh host keys, and any entry
/// (up to three levels deep) that is not world-readable. `etc` is the directory to
/// scan; the result names paths as `/etc/...`.
pub fn etc_secrets(etc: &Path) -> Vec<String> {
    let mut found: Vec<PathBuf> = ETC_SECRETS
        .iter()
        .filter_map(|p| Path::new(p).strip_prefix("/etc").ok())
        .map(|rel| etc.join(rel))
        .filter(|p| fs::symlink_metadata(p).is_ok())
        .collect();
    if let Ok(entries) = fs::read_dir(etc.join("ssh")) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
                found.push(entry.path());
            }
        }
    }
    unreadable(etc, 3, &mut found);
    let mut out: Vec<String> = found
        .iter()
        .filter_map(|p| p.strip_prefix(etc).ok())
        .map(|rel| Path::new("/etc").join(rel).to_string_lossy().into_owned())
        .collect();
    out.sort();
    out.dedup();
    // A masked directory hides everything below it.
    let dirs = out.clone();
    out.retain(|p| {
        !dirs
            .iter()
            .any(|d| d != p && Path::new(p).starts_with(Path::new(d)))
    });
    out
}

fn unreadable(dir: &Path, depth: u32, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        // Lock files are empty and harmless, and masking them breaks nothing either.
        if meta.permissions().mode() & 0o004 == 0 {
            found.push(entry.path());
        } else if meta.is_dir() && depth > 1 && !entry.file_type().is_ok_and(|t| t.is_symlink()) {
            unreadable(&entry.path(), depth - 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etc_secrets_finds_known_and_unreadable_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let etc = tmp.path();
        fs::write(etc.join("shadow"), "x").expect("shadow");
        fs::create_dir_all(etc.join("ssh")).expect("ssh");
        fs::write(etc.join("ssh/ssh_host_ed25519_key"), "k").expect("key");
        fs::write(etc.join("ssh/ssh_config"), "c").expect("config");
        fs::create_dir_all(etc.join("app/private")).expect("dir");
        fs::write(etc.join("app/private/token"), "t").expect("token");
        fs::set_permissions(etc.join("app/private"), fs::Permissions::from_mode(0o700))
            .expect("chmod");
        fs::set_permissions(
            etc.join("app/private/token"),
            fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        let found = etc_secrets(etc);
        assert_eq!(
            found,
            vec![
                "/etc/app/private".to_string(),
                "/etc/shadow".to_string(),
                "/etc/ssh/ssh_host_ed25519_key".to_string(),
            ]
        );
    }
}

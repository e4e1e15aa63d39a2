//! Kernel modules: `.modinfo` parsing and load order. The kernel `.deb` ships no
//! `modules.dep` (depmod runs at install time, and we never install it), so the
//! dependency graph comes from each module's own `depends=` field.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::elf::{Elf, ElfError};

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot list the modules under {path}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read a module's .modinfo")]
    Elf(#[from] ElfError),
    #[error("module {name} is neither a .ko file nor built into the kernel")]
    Missing { name: String },
    #[error("modules depend on each other in a cycle: {cycle}")]
    Cycle { cycle: String },
}

/// What `.modinfo` says about one module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub name: Option<String>,
    pub depends: Vec<String>,
}

/// Parse the NUL-separated `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for field in section.split(|&b| b == 0) {
        let field = String::from_utf8_lossy(field);
        if let Some(v) = field.strip_prefix("depends=") {
            info.depends
                .extend(v.split(',').filter(|d| !d.is_empty()).map(normalize));
        } else if let Some(v) = field.strip_prefix("name=") {
            info.name = Some(normalize(v));
        }
    }
    info
}

/// Module names treat `-` and `_` alike; the kernel reports them with `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module files of one kernel release, by module name, and its built-in modules.
#[derive(Debug, Default)]
pub struct ModuleTree {
    pub files: BTreeMap<String, PathBuf>,
    pub builtin: BTreeSet<String>,
}

impl ModuleTree {
    /// Index `lib/modules/<release>/` (files `*.ko`, `*.ko.xz`, `*.ko.zst`, `*.ko.gz`, and
    /// `modules.builtin`).
    pub fn scan(dir: &Path) -> Result<Self, ModulesError> {
        let mut tree = Self::default();
        walk(dir, &mut tree.files)?;
        if let Ok(text) = fs::read_to_string(dir.join("modules.builtin")) {
            for line in text.lines() {
                if let Some(name) = module_name(Path::new(line)) {
                    tree.builtin.insert(name);
                }
            }
        }
        Ok(tree)
    }

    /// `wanted` (skipping built-ins) and their `depends=` closure, dependencies first.
    /// `modinfo` reads a module file's `.modinfo` (after decompression, if needed).
    pub fn load_order(
        &self,
        wanted: &[&str],
        modinfo: &mut dyn FnMut(&Path) -> Result<ModInfo, ModulesError>,
    ) -> Result<Vec<String>, ModulesError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut stack = Vec::new();
        for name in wanted {
            self.visit(&normalize(name), modinfo, &mut done, &mut stack, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        modinfo: &mut dyn FnMut(&Path) -> Result<ModInfo, ModulesError>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        if done.contains(name) {
            return Ok(());
        }
        if let Some(at) = stack.iter().position(|s| s == name) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(name.to_owned());
            return Err(ModulesError::Cycle {
                cycle: cycle.join(" -> "),
            });
        }
        let Some(file) = self.files.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                return Ok(());
            }
            return Err(ModulesError::Missing { name: name.into() });
        };
        stack.push(name.to_owned());
        for dep in modinfo(file)?.depends {
            self.visit(&dep, modinfo, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_owned());
        order.push(name.to_owned());
        Ok(())
    }
}

/// Read `.modinfo` from an uncompressed module file.
pub fn read_modinfo(file: &Path) -> Result<ModInfo, ModulesError> {
    let section = Elf::open(file)?.section(".modinfo")?.unwrap_or_default();
    Ok(parse_modinfo(&section))
}

/// `kernel/drivers/virtio/virtio-ring.ko.xz` → `virtio_ring`.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(normalize(stem))
}

fn walk(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<(), ModulesError> {
    let entries = fs::read_dir(dir).map_err(|source| ModulesError::List {
        path: dir.into(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| ModulesError::List {
            path: dir.into(),
            source,
        })?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|source| ModulesError::List {
            path: path.clone(),
            source,
        })?;
        if kind.is_dir() {
            walk(&path, files)?;
        } else if let Some(name) = module_name(&path) {
            files.insert(name, path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_depends_and_name() {
        let raw = b"license=GPL\0depends=virtio,virtio-ring\0name=virtio_blk\0\0vermagic=6.1\0";
        assert_eq!(
            parse_modinfo(raw),
            ModInfo {
                name: Some("virtio_blk".into()),
                depends: vec!["virtio".into(), "virtio_ring".into()],
            }
        );
        assert_eq!(parse_modinfo(b"depends=\0"), ModInfo::default());
    }

    fn tree(
        mods: &[(&str, &[&str])],
        builtin: &[&str],
    ) -> (ModuleTree, BTreeMap<PathBuf, ModInfo>) {
        let mut t = ModuleTree::default();
        let mut infos = BTreeMap::new();
        for (name, deps) in mods {
            let path = PathBuf::from(format!("/m/{name}.ko"));
            t.files.insert((*name).into(), path.clone());
            infos.insert(
                path,
                ModInfo {
                    name: Some((*name).into()),
                    depends: deps.iter().map(|d| (*d).into()).collect(),
                },
            );
        }
        t.builtin = builtin.iter().map(|b| (*b).into()).collect();
        (t, infos)
    }

    #[test]
    fn orders_dependencies_first_once_each() {
        let (t, infos) = tree(
            &[
                ("virtio_ring", &[]),
                ("virtio", &["virtio_ring"]),
                ("virtio_mmio", &["virtio", "virtio_ring"]),
                ("virtio_blk", &["virtio", "virtio_ring"]),
                ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
                ("net_failover", &["failover"]),
                ("failover", &[]),
                ("overlay", &[]),
            ],
            &["ext4"],
        );
        let mut lookup = |p: &Path| Ok(infos[p].clone());
        let order = t
            .load_order(
                &["virtio_net", "virtio-mmio", "virtio_blk", "ext4", "overlay"],
                &mut lookup,
            )
            .expect("order");
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_mmio",
                "virtio_blk",
                "overlay"
            ]
        );
    }

    #[test]
    fn missing_and_cycles_are_errors() {
        let (t, infos) = tree(&[("a", &["b"]), ("b", &["a"])], &[]);
        let mut lookup = |p: &Path| Ok(infos[p].clone());
        assert!(matches!(
            t.load_order(&["a"], &mut lookup),
            Err(ModulesError::Cycle { cycle }) if cycle == "a -> b -> a"
        ));
        assert!(matches!(
            t.load_order(&["zzz"], &mut lookup),
            Err(ModulesError::Missing { .. })
        ));
    }

    #[test]
    fn scan_finds_compressed_and_builtin() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path();
        fs::create_dir_all(d.join("kernel/drivers/char/hw_random")).expect("mkdir");
        fs::write(d.join("kernel/drivers/char/hw_random/virtio-rng.ko.xz"), "").expect("w");
        fs::write(d.join("kernel/overlay.ko"), "").expect("w");
        fs::write(d.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").expect("w");
        let t = ModuleTree::scan(d).expect("scan");
        assert_eq!(
            t.files.keys().collect::<Vec<_>>(),
            ["overlay", "virtio_rng"]
        );
        assert!(t.builtin.contains("ext4"));
    }
}

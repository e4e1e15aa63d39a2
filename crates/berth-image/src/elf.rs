//! Just enough of ELF64 (little-endian) to read a kernel module's `.modinfo` and a
//! program's interpreter, `DT_NEEDED` entries and run paths. Reads are positioned, so
//! a 250 MB debug binary costs a few kilobytes of I/O.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
/// Sanity bound on header tables and string tables we are willing to allocate.
const MAX_TABLE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a 64-bit little-endian ELF file ({why})")]
    Malformed { path: PathBuf, why: &'static str },
}

/// An open ELF64 file.
pub struct Elf {
    path: PathBuf,
    file: File,
    len: u64,
    pub machine: u16,
    phoff: u64,
    phentsize: u64,
    phnum: u64,
    shoff: u64,
    shentsize: u64,
    shnum: u64,
    shstrndx: u64,
}

struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// What the dynamic loader needs to run a program.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dynamic {
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
    /// `DT_RUNPATH`, else `DT_RPATH`, split on `:`, `$ORIGIN` not yet expanded.
    pub runpath: Vec<String>,
}

impl Elf {
    pub fn open(path: &Path) -> Result<Self, ElfError> {
        let read_err = |source| ElfError::Read {
            path: path.into(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        let mut h = [0u8; 64];
        file.read_exact_at(&mut h, 0).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ElfError::Malformed {
                    path: path.into(),
                    why: "too short",
                }
            } else {
                read_err(e)
            }
        })?;
        let bad = |why| ElfError::Malformed {
            path: path.into(),
            why,
        };
        if &h[..4] != b"\x7fELF" {
            return Err(bad("no ELF magic"));
        }
        if h[4] != 2 || h[5] != 1 {
            return Err(bad("not ELFCLASS64/ELFDATA2LSB"));
        }
        Ok(Self {
            path: path.into(),
            file,
            len,
            machine: u16_at(&h, 18),
            phoff: u64_at(&h, 32),
            shoff: u64_at(&h, 40),
            phentsize: u64::from(u16_at(&h, 54)),
            phnum: u64::from(u16_at(&h, 56)),
            shentsize: u64::from(u16_at(&h, 58)),
            shnum: u64::from(u16_at(&h, 60)),
            shstrndx: u64::from(u16_at(&h, 62)),
        })
    }

    fn bad(&self, why: &'static str) -> ElfError {
        ElfError::Malformed {
            path: self.path.clone(),
            why,
        }
    }

    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ElfError> {
        if len > MAX_TABLE || offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(self.bad("a table lies outside the file"));
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| ElfError::Read {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }

    fn segments(&self) -> Result<Vec<Segment>, ElfError> {
        if self.phnum == 0 {
            return Ok(vec![]);
        }
        if self.phentsize < 56 {
            return Err(self.bad("program header entries too small"));
        }
        let table = self.read(self.phoff, self.phentsize * self.phnum)?;
        Ok(table
            .chunks_exact(self.phentsize as usize)
            .map(|p| Segment {
                kind: u32_at(p, 0),
                offset: u64_at(p, 8),
                vaddr: u64_at(p, 16),
                filesz: u64_at(p, 32),
            })
            .collect())
    }

    /// The contents of the section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Result<Option<Vec<u8>>, ElfError> {
        if self.shnum == 0 {
            return Ok(None);
        }
        if self.shentsize < 64 || self.shstrndx >= self.shnum {
            return Err(self.bad("bad section header table"));
        }
        let table = self.read(self.shoff, self.shentsize * self.shnum)?;
        let headers: Vec<&[u8]> = table.chunks_exact(self.shentsize as usize).collect();
        let strtab = headers[self.shstrndx as usize];
        let names = self.read(u64_at(strtab, 24), u64_at(strtab, 32))?;
        for sh in &headers {
            let name_off = u32_at(sh, 0) as usize;
            if cstr(&names, name_off) == Some(name.as_bytes()) {
                const SHT_NOBITS: u32 = 8;
                if u32_at(sh, 4) == SHT_NOBITS {
                    return Ok(Some(vec![]));
                }
                return self.read(u64_at(sh, 24), u64_at(sh, 32)).map(Some);
            }
        }
        Ok(None)
    }

    /// Interpreter, needed libraries and run path of a dynamically linked program or
    /// library; all empty for a static one.
    pub fn dynamic(&self) -> Result<Dynamic, ElfError> {
        let segments = self.segments()?;
        let mut out = Dynamic::default();
        if let Some(interp) = segments.iter().find(|s| s.kind == PT_INTERP) {
            let raw = self.read(interp.offset, interp.filesz)?;
            let s = cstr(&raw, 0).ok_or_else(|| self.bad("unterminated PT_INTERP"))?;
            out.interpreter = Some(String::from_utf8_lossy(s).into_owned());
        }
        let Some(dynamic) = segments.iter().find(|s| s.kind == PT_DYNAMIC) else {
            return Ok(out);
        };
        let raw = self.read(dynamic.offset, dynamic.filesz)?;
        let entries: Vec<(u64, u64)> = raw
            .chunks_exact(16)
            .map(|e| (u64_at(e, 0), u64_at(e, 8)))
            .take_while(|(tag, _)| *tag != DT_NULL)
            .collect();
        let find = |tag| entries.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v);
        let (Some(strtab_addr), Some(strsz)) = (find(DT_STRTAB), find(DT_STRSZ)) else {
            return Ok(out);
        };
        // DT_STRTAB is a virtual address: map it back through the loadable segments.
        let strtab_off = segments
            .iter()
            .filter(|s| s.kind == PT_LOAD)
            .find(|s| strtab_addr >= s.vaddr && strtab_addr < s.vaddr + s.filesz)
            .map(|s| strtab_addr - s.vaddr + s.offset)
            .ok_or_else(|| self.bad("DT_STRTAB outside every PT_LOAD segment"))?;
        let strings = self.read(strtab_off, strsz)?;
        let string = |off: u64| -> Result<String, ElfError> {
            let s = cstr(&strings, off as usize).ok_or_else(|| self.bad("bad dynamic string"))?;
            Ok(String::from_utf8_lossy(s).into_owned())
        };
        for (tag, val) in &entries {
            if *tag == DT_NEEDED {
                out.needed.push(string(*val)?);
            }
        }
        let path = match (find(DT_RUNPATH), find(DT_RPATH)) {
            (Some(off), _) | (None, Some(off)) => Some(string(off)?),
            (None, None) => None,
        };
        if let Some(path) = path {
            out.runpath = path
                .split(':')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect();
        }
        Ok(out)
    }
}

fn cstr(buf: &[u8], off: usize) -> Option<&[u8]> {
    let rest = buf.get(off..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..end])
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_test_binary() {
        let exe = std::env::current_exe().expect("exe");
        let elf = Elf::open(&exe).expect("open");
        assert_eq!(elf.machine, 62);
        let dynamic = elf.dynamic().expect("dynamic");
        assert_eq!(
            dynamic.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert!(
            dynamic.needed.iter().any(|n| n == "libc.so.6"),
            "{dynamic:?}"
        );
        assert!(elf.section(".text").expect("text").is_some());
        assert!(elf.section(".no-such").expect("none").is_none());
    }

    #[test]
    fn rejects_non_elf() {
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(
            tmp.path(),
            b"#!/bin/sh\necho not an elf, but long enough to read a header from\n",
        )
        .expect("write");
        assert!(matches!(
            Elf::open(tmp.path()),
            Err(ElfError::Malformed { .. })
        ));
    }
}

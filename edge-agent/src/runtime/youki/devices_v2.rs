//! The device allowlist on cgroup v2: a container's device rules compiled to
//! an eBPF `BPF_PROG_TYPE_CGROUP_DEVICE` program, attached to its cgroup.
//!
//! On cgroup v1 libcontainer writes the rules to the `devices` controller.
//! On cgroup v2 there is no such controller: the kernel asks a BPF program
//! attached to the cgroup instead, and libcontainer builds one only with its
//! `cgroupsv2_devices` feature (libbpf, a C library our static builds cannot
//! take). So the agent compiles the program itself, before the create, into
//! the bundle ([`FILE_NAME`]); the runtime helper attaches it to the
//! container's cgroup after libcontainer created the container and before it
//! is started, through raw `bpf(2)` calls ([`bpf`]). The program stays with
//! the cgroup and goes when the cgroup is removed.
//!
//! The rules are read as cgroup v1 reads `devices.allow` and `devices.deny`
//! (`security/device_cgroup.c`), so that a container is confined the same on
//! both: a rule of type `a` sets the default and forgets every exception; a
//! rule against the default adds an exception; a rule agreeing with the
//! default takes its access away from the exception of exactly that type,
//! major and minor. Then, with a default of deny, an access is allowed when
//! one exception covers all of it; with a default of allow, it is denied when
//! any exception overlaps it. The rules are the spec's, followed by the ones
//! libcgroups adds on v1 ([`LIBCGROUPS_DEFAULTS`]).
//!
//! The program: the context's fields loaded into registers once, then one
//! block per exception (type, access, major, minor: each check that fails
//! jumps to the next block; a block that passes them all returns the
//! exception's verdict), then the default. Only forward jumps, so the
//! verifier has nothing to prove beyond the return value being 0 or 1.

mod bpf;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, Spec};

use super::cgroup::Hierarchies;
use super::program_file;

/// Errors compiling, storing, loading or attaching a device program.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// A rule's type is not one the device cgroup knows (cgroup v1 refuses
    /// it too).
    #[error("device rule {index}: type {typ:?} is not a, b or c")]
    BadType { index: usize, typ: String },
    /// A rule's access holds something besides `r`, `w` and `m`.
    #[error("device rule {index}: access {access:?} is not made of r, w and m")]
    BadAccess { index: usize, access: String },
    /// A rule's major or minor number is out of range.
    #[error("device rule {index}: {field} {value} is out of range (expected 0 to {max})")]
    BadNumber {
        index: usize,
        field: &'static str,
        value: i64,
        max: i64,
    },
    /// The program would be longer than the kernel takes.
    #[error("device program: {len} instructions, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    /// A stored program could not be written or read.
    #[error("device program {0}")]
    File(#[from] program_file::ProgramFileError),
    /// The container's cgroup directory could not be opened.
    #[error("opening cgroup {path} to attach the device program: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    /// The kernel refused to load the program; `log` is the verifier's end.
    #[error("loading the device program (bpf BPF_PROG_LOAD): {source}{log}")]
    Load { source: std::io::Error, log: String },
    /// The kernel refused to attach the program to the cgroup.
    #[error("attaching the device program to cgroup {path} (bpf BPF_PROG_ATTACH): {source}")]
    Attach {
        path: String,
        source: std::io::Error,
    },
}

/// The program's file in a container's bundle.
pub const FILE_NAME: &str = "devices.bpf";

/// Instructions accepted at most: the kernel's `BPF_MAXINSNS`, far above
/// what any rule list of ours needs (a few per rule).
pub const MAX_INSNS: usize = 4096;

/// What libcgroups adds after the spec's own rules on cgroup v1 (its
/// `default_devices`, then `default_allow_devices`), as
/// `(type, major, minor, access)` with `None` for `*`, all allowed: every
/// container may mknod any node, and use `/dev/null`, `zero`, `full`,
/// `tty`, `urandom`, `random`, `console`, its pseudo-terminals, `ptmx` and
/// `/dev/net/tun`.
pub const LIBCGROUPS_DEFAULTS: &[(Kind, Option<u32>, Option<u32>, u32)] = &[
    (Kind::Char, Some(1), Some(3), ACC_ALL),
    (Kind::Char, Some(1), Some(5), ACC_ALL),
    (Kind::Char, Some(1), Some(7), ACC_ALL),
    (Kind::Char, Some(5), Some(0), ACC_ALL),
    (Kind::Char, Some(1), Some(9), ACC_ALL),
    (Kind::Char, Some(1), Some(8), ACC_ALL),
    (Kind::Char, None, None, ACC_MKNOD),
    (Kind::Block, None, None, ACC_MKNOD),
    (Kind::Char, Some(5), Some(1), ACC_ALL),
    (Kind::Char, Some(136), None, ACC_ALL),
    (Kind::Char, Some(5), Some(2), ACC_ALL),
    (Kind::Char, Some(10), Some(200), ACC_ALL),
];

/// A device type as the kernel passes it (`BPF_DEVCG_DEV_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block = 1,
    Char = 2,
}

/// Access bits as the kernel passes them (`BPF_DEVCG_ACC_*`).
pub const ACC_MKNOD: u32 = 1;
pub const ACC_READ: u32 = 2;
pub const ACC_WRITE: u32 = 4;
pub const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// One exception to the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exception {
    kind: Kind,
    major: Option<u32>,
    minor: Option<u32>,
    access: u32,
}

/// A rule list reduced as cgroup v1 reduces it: a default and exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default_allow: bool,
    exceptions: Vec<Exception>,
}

impl Filter {
    /// The rules of a container whose spec carries `rules`: those, then
    /// libcgroups' defaults, in the order libcgroups writes them on v1.
    pub fn for_container(rules: &[LinuxDeviceCgroup]) -> Result<Self, DevicesError> {
        let mut filter = Self {
            // Until a rule of type `a` says otherwise, what a new v1 cgroup
            // under the root one has: everything allowed (our specs start
            // with a deny-all).
            default_allow: true,
            exceptions: Vec::new(),
        };
        for (index, rule) in rules.iter().enumerate() {
            filter.apply_oci(index, rule)?;
        }
        for &(kind, major, minor, access) in LIBCGROUPS_DEFAULTS {
            filter.apply(true, kind, major, minor, access);
        }
        Ok(filter)
    }

    /// Whether every device is allowed (a privileged container): no
    /// program is needed.
    pub fn allows_everything(&self) -> bool {
        self.default_allow && self.exceptions.is_empty()
    }

    fn apply_oci(&mut self, index: usize, rule: &LinuxDeviceCgroup) -> Result<(), DevicesError> {
        let kind = match rule.typ().unwrap_or_default() {
            LinuxDeviceType::A => {
                self.default_allow = rule.allow();
                self.exceptions.clear();
                return Ok(());
            }
            LinuxDeviceType::B => Kind::Block,
            LinuxDeviceType::C => Kind::Char,
            other => {
                return Err(DevicesError::BadType {
                    index,
                    typ: other.as_str().to_owned(),
                });
            }
        };
        let number = |field: &'static str, value: Option<i64>| match value {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .ok()
                .filter(|n| i32::try_from(*n).is_ok())
                .map(Some)
                .ok_or(DevicesError::BadNumber {
                    index,
                    field,
                    value: v,
                    max: i64::from(i32::MAX),
                }),
        };
        let major = number("major", rule.major())?;
        let minor = number("minor", rule.minor())?;
        let text = rule.access().as_deref().unwrap_or_default();
        let access = parse_access(text).ok_or_else(|| DevicesError::BadAccess {
            index,
            access: text.to_owned(),
        })?;
        self.apply(rule.allow(), kind, major, minor, access);
        Ok(())
    }

    fn apply(
        &mut self,
        allow: bool,
        kind: Kind,
        major: Option<u32>,
        minor: Option<u32>,
        access: u32,
    ) {
        let same = |e: &Exception| e.kind == kind && e.major == major && e.minor == minor;
        if allow == self.default_allow {
            // Only the exception of exactly this device loses the access: a
            // wildcard exception is not split, as in cgroup v1.
            for e in self.exceptions.iter_mut().filter(|e| same(e)) {
                e.access &= !access;
            }
            self.exceptions.retain(|e| e.access != 0);
        } else if let Some(e) = self.exceptions.iter_mut().find(|e| same(e)) {
            e.access |= access;
        } else if access != 0 {
            self.exceptions.push(Exception {
                kind,
                major,
                minor,
                access,
            });
        }
    }

    /// The eBPF program deciding as this filter does.
    pub fn program(&self) -> Result<Program, DevicesError> {
        let mut insns = vec![
            // r2 = access_type; r3 = type (low half); r4 = access (high half)
            Insn::new(LDX_W, R2, R1, 0, 0),
            Insn::new(MOV32_X, R3, R2, 0, 0),
            Insn::new(AND32_K, R3, 0, 0, 0xffff),
            Insn::new(MOV32_X, R4, R2, 0, 0),
            Insn::new(RSH32_K, R4, 0, 0, 16),
            // r5 = major, r6 = minor
            Insn::new(LDX_W, R5, R1, 4, 0),
            Insn::new(LDX_W, R6, R1, 8, 0),
        ];
        let verdict = i32::from(!self.default_allow);
        for e in &self.exceptions {
            // Checks first, with their jump offsets left to fill in.
            let mut block = vec![Insn::new(JNE_K, R3, 0, 0, e.kind as i32)];
            if e.access != ACC_ALL {
                block.push(Insn::new(MOV32_X, R7, R4, 0, 0));
                if self.default_allow {
                    // Denied if the access asked overlaps the exception's.
                    block.push(Insn::new(AND32_K, R7, 0, 0, e.access as i32));
                    block.push(Insn::new(JEQ_K, R7, 0, 0, 0));
                } else {
                    // Allowed only if the exception covers all of it.
                    block.push(Insn::new(AND32_K, R7, 0, 0, !e.access as i32));
                    block.push(Insn::new(JNE_K, R7, 0, 0, 0));
                }
            }
            for (reg, number) in [(R5, e.major), (R6, e.minor)] {
                if let Some(n) = number {
                    // Below 2^31 (checked when read): the immediate's sign
                    // extension cannot change it.
                    block.push(Insn::new(JNE_K, reg, 0, 0, n as i32));
                }
            }
            block.push(Insn::new(MOV64_K, R0, 0, 0, verdict));
            block.push(Insn::new(EXIT, 0, 0, 0, 0));
            let len = block.len();
            for (i, insn) in block.iter_mut().enumerate() {
                if insn.code == JNE_K || insn.code == JEQ_K {
                    // To the first instruction after this block.
                    insn.off = i16::try_from(len - i - 1).unwrap_or(i16::MAX);
                }
            }
            insns.extend(block);
        }
        insns.push(Insn::new(MOV64_K, R0, 0, 0, i32::from(self.default_allow)));
        insns.push(Insn::new(EXIT, 0, 0, 0, 0));
        if insns.len() > MAX_INSNS {
            return Err(DevicesError::TooLong {
                len: insns.len(),
                max: MAX_INSNS,
            });
        }
        Ok(Program(insns))
    }
}

/// `rwm` letters to access bits; `None` for anything else. Empty is no
/// access, as cgroup v1 reads it.
fn parse_access(text: &str) -> Option<u32> {
    text.chars().try_fold(0, |acc, c| match c {
        'm' => Some(acc | ACC_MKNOD),
        'r' => Some(acc | ACC_READ),
        'w' => Some(acc | ACC_WRITE),
        _ => None,
    })
}

// eBPF opcodes (linux/bpf.h, linux/bpf_common.h).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV32_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const AND32_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RSH32_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;
const R7: u8 = 7;
/// One eBPF instruction, laid out as the kernel's `struct bpf_insn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// `dst_reg:4, src_reg:4`: a C bit-field, whose order follows the
    /// machine's byte order.
    regs: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        let regs = if cfg!(target_endian = "little") {
            dst | src << 4
        } else {
            dst << 4 | src
        };
        Self {
            code,
            regs,
            off,
            imm,
        }
    }

    /// The destination register.
    pub fn dst(&self) -> u8 {
        if cfg!(target_endian = "little") {
            self.regs & 0xf
        } else {
            self.regs >> 4
        }
    }

    /// The source register.
    pub fn src(&self) -> u8 {
        if cfg!(target_endian = "little") {
            self.regs >> 4
        } else {
            self.regs & 0xf
        }
    }
}

/// A compiled device program, ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program(Vec<Insn>);

impl Program {
    /// The instructions.
    pub fn instructions(&self) -> &[Insn] {
        &self.0
    }

    /// Writes the program to `path`, whole or not at all.
    pub fn save(&self, path: &Path) -> Result<(), DevicesError> {
        Ok(program_file::save(
            path,
            self.0.iter().map(|i| {
                let [o0, o1] = i.off.to_ne_bytes();
                let [m0, m1, m2, m3] = i.imm.to_ne_bytes();
                [i.code, i.regs, o0, o1, m0, m1, m2, m3]
            }),
        )?)
    }

    /// Reads a program [`save`](Self::save) wrote, refusing anything that is
    /// not a whole number of instructions within [`MAX_INSNS`]; the kernel
    /// checks the rest.
    pub fn load(path: &Path) -> Result<Self, DevicesError> {
        let insns = program_file::load(path, MAX_INSNS)?;
        Ok(Self(
            insns
                .iter()
                .map(|c| Insn {
                    code: c[0],
                    regs: c[1],
                    off: i16::from_ne_bytes([c[2], c[3]]),
                    imm: i32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect(),
        ))
    }

    /// Loads the program into the kernel and attaches it to the cgroup
    /// directory `cgroup`. The attachment holds the program; nothing is
    /// left open here.
    pub fn attach(&self, cgroup: &Path) -> Result<(), DevicesError> {
        bpf::attach(&self.0, cgroup)
    }
}

/// What the runtime helper attaches: a stored program and the cgroup v2
/// directory it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub program: PathBuf,
    pub cgroup: PathBuf,
}

/// For a container whose cgroup is `cgroup` (relative to each hierarchy
/// root): when the host's devices are controlled through cgroup v2 and the
/// spec does not allow every device, compiles the spec's rules into
/// `{bundle}/devices.bpf` and says where it goes. `None` on cgroup v1 hosts
/// (libcontainer writes the `devices` controller) and for privileged
/// containers.
pub fn prepare(
    hierarchies: &Hierarchies,
    spec: &Spec,
    bundle: &Path,
    cgroup: &Path,
) -> Result<Option<Attach>, DevicesError> {
    let Some(unified) = hierarchies.devices_on_v2() else {
        return Ok(None);
    };
    let rules = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_deref())
        .unwrap_or_default();
    let filter = Filter::for_container(rules)?;
    if filter.allows_everything() {
        return Ok(None);
    }
    let program = bundle.join(FILE_NAME);
    filter.program()?.save(&program)?;
    Ok(Some(Attach {
        program,
        cgroup: unified.join(cgroup),
    }))
}

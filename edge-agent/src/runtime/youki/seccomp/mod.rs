//! Seccomp without libseccomp: Docker's default profile compiled to a
//! classic BPF program for the architecture the agent is built for, and the
//! libcontainer executor that installs it as the container process's very
//! last step before `execve`.
//!
//! libcontainer applies `linux.seccomp` only when built with libseccomp, a
//! C library we do not cross-build; without it the profile is silently
//! skipped. So the agent compiles the profile itself (pure data, in the
//! agent, before the create), writes the program into the bundle, and the
//! runtime helper hands it to [`FilteredExecutor`], which runs in the
//! container's init after capabilities are dropped and `no_new_privs` is
//! set, exactly where libcontainer's own seccomp step would be.
//!
//! The program: the architecture is checked first (a foreign `AUDIT_ARCH`,
//! and on x86_64 the x32 ABI, kill the process: no container of ours runs
//! such code, and a kill is visible where an errno would be puzzling), then
//! a balanced comparison tree over the syscall number finds the action in
//! about log2(intervals) jumps, instead of a linear scan every syscall of
//! every container would pay for.

mod executor;
mod profile;
mod syscalls;

use std::collections::BTreeMap;
use std::path::Path;

pub use self::executor::FilteredExecutor;
use self::profile::{Action, ArgCheck, DEFAULT_ERRNO, RULES, When};
use super::program_file;

/// Errors compiling, storing or loading a seccomp program.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The agent was built for an architecture without a known `AUDIT_ARCH`.
    #[error("seccomp: no AUDIT_ARCH known for this architecture ({arch})")]
    UnsupportedArch { arch: &'static str },
    /// The program is longer than the kernel accepts.
    #[error("seccomp: program of {len} instructions, over the kernel's {max}")]
    TooLong { len: usize, max: usize },
    /// A stored program could not be written or read.
    #[error("seccomp program {0}")]
    File(#[from] program_file::ProgramFileError),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter: {0}")]
    Install(std::io::Error),
}

/// The program's file in a container's bundle; a container without one runs
/// unconfined, and so do the commands exec'd into it.
pub const FILE_NAME: &str = "seccomp.bpf";

/// The kernel's limit on a filter's length (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

/// One classic BPF instruction, laid out as the kernel's `sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A compiled filter, ready to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program(Vec<Insn>);

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGE_K: u16 = 0x35;
const JMP_JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

// Offsets in `struct seccomp_data`; the arguments are 64-bit.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const OFF_ARG0_LO: u32 = 16;
#[cfg(target_endian = "big")]
const OFF_ARG0_LO: u32 = 20;
#[cfg(target_endian = "little")]
const OFF_ARG0_HI: u32 = 20;
#[cfg(target_endian = "big")]
const OFF_ARG0_HI: u32 = 16;

const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;
const RET_ERRNO: u32 = libc::SECCOMP_RET_ERRNO;

/// `AUDIT_ARCH_*` of the architecture the agent is built for: its ELF
/// machine, 64-bit and little-endian flags (linux/audit.h).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(target_arch = "arm")]
const AUDIT_ARCH: Option<u32> = Some(0x4000_0028);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
const AUDIT_ARCH: Option<u32> = None;

/// Syscall numbers at or above this on x86_64 are the x32 ABI.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// What the filter does with one syscall number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Action(Action),
    /// No rule names it: EPERM.
    Default,
}

/// Which action each syscall gets for a container whose capability set
/// (bounding) is `caps`, as Docker resolves its profile: rules whose
/// capability condition holds, names unknown on this architecture skipped,
/// an unconditional allow winning over any other rule for the same number.
fn resolve(caps: u64) -> BTreeMap<u32, Action> {
    let has = |cap: u32| cap < 64 && caps & (1u64 << cap) != 0;
    let mut out = BTreeMap::new();
    for rule in RULES {
        let applies = match rule.when {
            When::Always => true,
            When::Has(cap) => has(cap),
            When::Lacks(cap) => !has(cap),
        };
        if !applies {
            continue;
        }
        for name in rule.names {
            let Some(nr) = syscalls::number(name) else {
                continue;
            };
            out.entry(nr)
                .and_modify(|a| {
                    if rule.action == Action::Allow {
                        *a = Action::Allow;
                    }
                })
                .or_insert(rule.action);
        }
    }
    out
}

/// Docker's default profile for a container with capability set `caps`
/// (bit n = capability n), as a program for this architecture.
pub fn compile(caps: u64) -> Result<Program, SeccompError> {
    let arch = AUDIT_ARCH.ok_or(SeccompError::UnsupportedArch {
        arch: std::env::consts::ARCH,
    })?;
    let mut code = vec![
        load(OFF_ARCH),
        jump(JMP_JEQ_K, arch, 1, 0),
        ret(RET_KILL_PROCESS),
        load(OFF_NR),
    ];
    if cfg!(target_arch = "x86_64") {
        code.push(jump(JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        code.push(ret(RET_KILL_PROCESS));
    }
    code.extend(tree(&intervals(&resolve(caps))));
    if code.len() > MAX_INSNS {
        return Err(SeccompError::TooLong {
            len: code.len(),
            max: MAX_INSNS,
        });
    }
    Ok(Program(code))
}

/// The number line cut into intervals `[start, next start)` of one leaf
/// each, neighbours with the same leaf merged.
fn intervals(actions: &BTreeMap<u32, Action>) -> Vec<(u32, Leaf)> {
    let mut out: Vec<(u32, Leaf)> = Vec::new();
    let mut push = |start: u32, leaf: Leaf| {
        if out.last().is_none_or(|(_, last)| *last != leaf) {
            out.push((start, leaf));
        }
    };
    let mut next = 0u32;
    for (&nr, &action) in actions {
        if nr > next {
            push(next, Leaf::Default);
        }
        push(nr, Leaf::Action(action));
        next = nr.saturating_add(1);
    }
    push(next, Leaf::Default);
    out
}

/// A balanced tree over `intervals` (the syscall number in A): each node
/// compares against the first start of its right half. Jumps only go
/// forward, as classic BPF requires; a left half too long for an 8-bit jump
/// is stepped over with `ja`, which has 32 bits.
fn tree(intervals: &[(u32, Leaf)]) -> Vec<Insn> {
    match intervals {
        [] => vec![ret(RET_ERRNO | u32::from(DEFAULT_ERRNO))],
        [(_, leaf)] => leaf_code(*leaf),
        _ => {
            let mid = intervals.len() / 2;
            let pivot = intervals[mid].0;
            let left = tree(&intervals[..mid]);
            let right = tree(&intervals[mid..]);
            let mut out = Vec::with_capacity(left.len() + right.len() + 2);
            match u8::try_from(left.len()) {
                Ok(skip) => out.push(jump(JMP_JGE_K, pivot, skip, 0)),
                Err(_) => {
                    out.push(jump(JMP_JGE_K, pivot, 0, 1));
                    out.push(Insn {
                        code: JMP_JA,
                        jt: 0,
                        jf: 0,
                        k: u32::try_from(left.len()).unwrap_or(u32::MAX),
                    });
                }
            }
            out.extend(left);
            out.extend(right);
            out
        }
    }
}

/// The code of one leaf; every path ends in a return.
fn leaf_code(leaf: Leaf) -> Vec<Insn> {
    let deny = ret(RET_ERRNO | u32::from(DEFAULT_ERRNO));
    let allow = ret(RET_ALLOW);
    match leaf {
        Leaf::Default => vec![deny],
        Leaf::Action(Action::Allow) => vec![allow],
        Leaf::Action(Action::Errno(errno)) => vec![ret(RET_ERRNO | u32::from(errno))],
        // The high half must be zero, then the low half one of the values.
        Leaf::Action(Action::AllowIf(ArgCheck::OneOf(values))) => {
            let n = u8::try_from(values.len()).unwrap_or(u8::MAX).min(250);
            let mut out = vec![
                load(OFF_ARG0_HI),
                jump(JMP_JEQ_K, 0, 0, n + 1),
                load(OFF_ARG0_LO),
            ];
            for (i, v) in values.iter().take(usize::from(n)).enumerate() {
                let i = u8::try_from(i).unwrap_or(0);
                out.push(jump(JMP_JEQ_K, *v, n - i, 0));
            }
            out.push(deny);
            out.push(allow);
            out
        }
        Leaf::Action(Action::AllowIf(ArgCheck::Not(value))) => vec![
            load(OFF_ARG0_HI),
            jump(JMP_JEQ_K, 0, 0, 2),
            load(OFF_ARG0_LO),
            jump(JMP_JEQ_K, value, 1, 0),
            allow,
            deny,
        ],
        // The mask has no high bits, so only the low half matters.
        Leaf::Action(Action::AllowIf(ArgCheck::NoneOf(mask))) => {
            vec![load(OFF_ARG0_LO), jump(JMP_JSET_K, mask, 1, 0), allow, deny]
        }
    }
}

fn load(offset: u32) -> Insn {
    Insn {
        code: LD_W_ABS,
        jt: 0,
        jf: 0,
        k: offset,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

fn ret(k: u32) -> Insn {
    Insn {
        code: RET_K,
        jt: 0,
        jf: 0,
        k,
    }
}

impl Program {
    /// The instructions.
    #[cfg(test)]
    fn insns(&self) -> &[Insn] {
        &self.0
    }

    /// Writes the program to `path`, whole or not at all.
    pub fn save(&self, path: &Path) -> Result<(), SeccompError> {
        Ok(program_file::save(
            path,
            self.0.iter().map(|i| {
                let [c0, c1] = i.code.to_ne_bytes();
                let [k0, k1, k2, k3] = i.k.to_ne_bytes();
                [c0, c1, i.jt, i.jf, k0, k1, k2, k3]
            }),
        )?)
    }

    /// Reads a program [`save`](Self::save) wrote, refusing anything that is
    /// not a whole number of instructions within [`MAX_INSNS`]; the kernel
    /// checks the rest.
    pub fn load(path: &Path) -> Result<Self, SeccompError> {
        let insns = program_file::load(path, MAX_INSNS)?;
        Ok(Self(
            insns
                .iter()
                .map(|c| Insn {
                    code: u16::from_ne_bytes([c[0], c[1]]),
                    jt: c[2],
                    jf: c[3],
                    k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect(),
        ))
    }

    /// Installs the filter on the calling thread, for good: it is inherited
    /// across `execve` and by every child. Needs `no_new_privs` (or
    /// CAP_SYS_ADMIN). Allocates nothing.
    pub fn install(&self) -> Result<(), SeccompError> {
        let len = u16::try_from(self.0.len()).map_err(|_| SeccompError::TooLong {
            len: self.0.len(),
            max: MAX_INSNS,
        })?;
        let prog = libc::sock_fprog {
            len,
            // `Insn` is `repr(C)` with `sock_filter`'s fields in its order.
            filter: self.0.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        };
        // SAFETY: `prog` points at the instructions, alive for the call; the
        // kernel copies the program before returning.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::c_ulong::from(libc::SECCOMP_MODE_FILTER),
                std::ptr::from_ref(&prog) as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc != 0 {
            return Err(SeccompError::Install(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

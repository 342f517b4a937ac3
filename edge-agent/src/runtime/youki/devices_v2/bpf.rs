//! Raw `bpf(2)` calls: loading a cgroup device program and attaching it to
//! a cgroup v2 directory, with no libbpf.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{DevicesError, Insn};

// linux/bpf.h
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Our program runs together with any an ancestor cgroup has (systemd's
/// `DevicePolicy`, say), and no program of a descendant can replace it: the
/// kernel runs every `ALLOW_MULTI` program from the cgroup up, and a device
/// is allowed only when all of them allow it.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The program calls no helper, so no GPL-only one: the kernel takes any
/// license string; ours is the project's.
const LICENSE: &[u8] = b"Apache-2.0\0";
/// Shown by `bpftool prog` (at most 15 bytes).
const NAME: &[u8] = b"flotilla_devs";
/// The verifier's log asked for when a load fails, and the part kept.
const LOG_BYTES: usize = 16 * 1024;
const LOG_KEPT: usize = 1024;
/// `EAGAIN` from a load is the verifier interrupted: tried this often.
const LOAD_ATTEMPTS: usize = 5;

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to `prog_name`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// Loads `insns` as a cgroup device program and attaches it to `cgroup`.
pub fn attach(insns: &[Insn], cgroup: &Path) -> Result<(), DevicesError> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(cgroup)
        .map_err(|source| DevicesError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
    let program = load(insns)?;
    attach_fd(&program, &dir).map_err(|source| DevicesError::Attach {
        path: cgroup.display().to_string(),
        source,
    })
}

fn attach_fd(program: &OwnedFd, cgroup: &File) -> io::Result<()> {
    let fd = |raw: i32| u32::try_from(raw).map_err(|_| io::Error::from_raw_os_error(libc::EBADF));
    let mut attr = ProgAttachAttr {
        target_fd: fd(cgroup.as_raw_fd())?,
        attach_bpf_fd: fd(program.as_raw_fd())?,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

fn load(insns: &[Insn]) -> Result<OwnedFd, DevicesError> {
    raise_memlock();
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(insns.len()).unwrap_or(u32::MAX),
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    attr.prog_name[..NAME.len()].copy_from_slice(NAME);
    let source = match load_attr(&mut attr) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    // Again with the verifier's log, to say why (a log from the first try
    // could fail a good program on a log too small for it).
    let mut log = vec![0u8; LOG_BYTES];
    attr.log_level = 1;
    attr.log_size = u32::try_from(log.len()).unwrap_or(0);
    attr.log_buf = log.as_mut_ptr() as u64;
    let again = load_attr(&mut attr);
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let text = text.trim();
    let mut start = text.len().saturating_sub(LOG_KEPT);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    match again {
        Ok(fd) => Ok(fd),
        Err(_) => Err(DevicesError::Load {
            source,
            log: if text.is_empty() {
                String::new()
            } else {
                format!("; verifier: {}", &text[start..])
            },
        }),
    }
}

fn load_attr(attr: &mut ProgLoadAttr) -> io::Result<OwnedFd> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match bpf(BPF_PROG_LOAD, attr) {
            Ok(fd) => {
                let raw = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
                // SAFETY: BPF_PROG_LOAD returned a new descriptor that
                // nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && attempts < LOAD_ATTEMPTS => {}
            Err(e) => return Err(e),
        }
    }
}

/// Kernels before 5.11 charge BPF programs to `RLIMIT_MEMLOCK`, summed
/// over every process of the user, and a service's limit can be as low as
/// 64 KiB. The limit is raised in this process only: the runtime helper,
/// after the container's processes were cloned, so they do not inherit it.
/// A failure is left for the load to report.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit and getrlimit read and write only the struct given.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) == 0 {
            return;
        }
        let mut current = unlimited;
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) == 0 {
            current.rlim_cur = current.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &current);
        }
    }
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `repr(C)` prefix of `union bpf_attr` for `cmd`,
    // passed with its exact size (the kernel zero-fills the rest); the
    // buffers it points to outlive the call.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

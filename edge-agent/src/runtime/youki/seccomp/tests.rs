//! The compiled program run through a classic-BPF interpreter written
//! here, against the profile resolved directly.

use super::*;

/// `struct seccomp_data` for one call.
struct Call {
    nr: u32,
    arch: u32,
    arg0: u64,
}

impl Call {
    fn new(nr: u32, arg0: u64) -> Self {
        Self {
            nr,
            arch: AUDIT_ARCH.unwrap(),
            arg0,
        }
    }

    fn bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&self.nr.to_ne_bytes());
        b[4..8].copy_from_slice(&self.arch.to_ne_bytes());
        b[16..24].copy_from_slice(&self.arg0.to_ne_bytes());
        b
    }
}

/// Runs `prog` on `call` as the kernel would: A register, absolute word
/// loads, forward jumps; returns the action and how many instructions ran.
fn run(prog: &Program, call: &Call) -> (u32, usize) {
    let data = call.bytes();
    let code = prog.insns();
    let (mut pc, mut a, mut steps) = (0usize, 0u32, 0usize);
    loop {
        let i = code[pc];
        steps += 1;
        pc += 1;
        match i.code {
            LD_W_ABS => {
                let k = i.k as usize;
                a = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
            }
            JMP_JA => pc += i.k as usize,
            JMP_JEQ_K | JMP_JGE_K | JMP_JSET_K => {
                let taken = match i.code {
                    JMP_JEQ_K => a == i.k,
                    JMP_JGE_K => a >= i.k,
                    _ => a & i.k != 0,
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            RET_K => return (i.k, steps),
            other => panic!("opcode {other:#x} at {}", pc - 1),
        }
        assert!(pc < code.len(), "ran off the end");
    }
}

const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;
const ENOSYS: u32 = RET_ERRNO | libc::ENOSYS as u32;
const CAP_SYS_ADMIN: u64 = 1 << 21;
const CAP_SYS_BOOT: u64 = 1 << 22;

fn nr(name: &str) -> u32 {
    syscalls::number(name).unwrap_or_else(|| panic!("{name} has no number here"))
}

/// What the profile says of `(nr, arg0)`, computed without the program.
fn expected(actions: &BTreeMap<u32, Action>, nr: u32, arg0: u64) -> u32 {
    let (lo, hi) = (arg0 as u32, (arg0 >> 32) as u32);
    match actions.get(&nr) {
        None => EPERM,
        Some(Action::Allow) => RET_ALLOW,
        Some(Action::Errno(e)) => RET_ERRNO | u32::from(*e),
        Some(Action::AllowIf(check)) => {
            let ok = match check {
                ArgCheck::OneOf(v) => hi == 0 && v.contains(&lo),
                ArgCheck::Not(v) => hi != 0 || lo != *v,
                ArgCheck::NoneOf(m) => lo & m == 0,
            };
            if ok { RET_ALLOW } else { EPERM }
        }
    }
}

#[test]
fn every_syscall_gets_what_the_profile_says() {
    for caps in [0, CAP_SYS_ADMIN | CAP_SYS_BOOT, u64::MAX] {
        let prog = compile(caps).unwrap();
        let actions = resolve(caps);
        let max_nr = *actions.keys().max().unwrap();
        let mut worst = 0;
        let numbers =
            (0..=1100)
                .chain(max_nr - 5..=max_nr + 5)
                .chain([0x3fff_ffff, u32::MAX - 1, u32::MAX]);
        for n in numbers {
            for arg0 in [0, 8, 40, 0x1_0000_0000, 0x1000_0000, 0xffff_ffff, 0x2_0008] {
                let want = expected(&actions, n, arg0);
                let want = if cfg!(target_arch = "x86_64") && n >= X32_SYSCALL_BIT {
                    RET_KILL_PROCESS
                } else {
                    want
                };
                let (got, steps) = run(&prog, &Call::new(n, arg0));
                assert_eq!(got, want, "caps {caps:#x}, syscall {n}, arg0 {arg0:#x}");
                worst = worst.max(steps);
            }
        }
        eprintln!(
            "caps {caps:#x}: {} instructions, at most {worst} run",
            prog.insns().len()
        );
        // A balanced tree: a dozen or so comparisons, not hundreds.
        assert!(worst < 30, "{worst} instructions for one syscall");
        assert!(prog.insns().len() < MAX_INSNS);
    }
}

#[test]
fn docker_defaults_hold() {
    let prog = compile(crate::runtime::youki::spec::capability_mask(
        &crate::runtime::youki::spec::default_capabilities(),
    ))
    .unwrap();
    let check = |name: &str, arg0: u64, want: u32| {
        assert_eq!(
            run(&prog, &Call::new(nr(name), arg0)).0,
            want,
            "{name}({arg0:#x})"
        );
    };
    for name in ["read", "write", "execve", "futex", "exit_group", "chroot"] {
        check(name, 0, RET_ALLOW);
    }
    for name in ["mount", "unshare", "setns", "reboot", "bpf"] {
        check(name, 0, EPERM);
    }
    check("ptrace", 0, RET_ALLOW);
    // Calls the profile does not name at all.
    for number in [libc::SYS_swapon, libc::SYS_add_key, libc::SYS_keyctl] {
        let call = Call::new(u32::try_from(number).unwrap(), 0);
        assert_eq!(run(&prog, &call).0, EPERM, "syscall {number}");
    }
    check("clone3", 0, ENOSYS);
    let sigchld = libc::SIGCHLD as u64;
    check("clone", sigchld, RET_ALLOW);
    check("clone", libc::CLONE_NEWUSER as u64 | sigchld, EPERM);
    check("clone", libc::CLONE_NEWNS as u64, EPERM);
    check("personality", 8, RET_ALLOW);
    check("personality", 0xffff_ffff, RET_ALLOW);
    check("personality", 0x0040_0000, EPERM);
    check("personality", 0x1_0000_0008, EPERM);
    check("socket", libc::AF_INET as u64, RET_ALLOW);
    check("socket", libc::AF_VSOCK as u64, EPERM);
    check("socket", 0x1_0000_0028, RET_ALLOW);

    let admin = compile(CAP_SYS_ADMIN).unwrap();
    for name in ["mount", "unshare", "clone3"] {
        assert_eq!(run(&admin, &Call::new(nr(name), 0)).0, RET_ALLOW, "{name}");
    }
    let newuser = libc::CLONE_NEWUSER as u64;
    assert_eq!(run(&admin, &Call::new(nr("clone"), newuser)).0, RET_ALLOW);
}

#[test]
fn foreign_architectures_are_killed() {
    let prog = compile(0).unwrap();
    let mut call = Call::new(nr("read"), 0);
    // i386 on x86_64, arm on aarch64, aarch64 on arm.
    for arch in [0x4000_0003, 0x4000_0028, 0xC000_00B7, 0xC000_003E] {
        if Some(arch) == AUDIT_ARCH {
            continue;
        }
        call.arch = arch;
        assert_eq!(run(&prog, &call).0, RET_KILL_PROCESS, "arch {arch:#x}");
    }
    if cfg!(target_arch = "x86_64") {
        let x32_read = Call::new(X32_SYSCALL_BIT, 0);
        assert_eq!(run(&prog, &x32_read).0, RET_KILL_PROCESS);
    }
}

#[test]
fn every_arch_knows_the_core_calls() {
    for name in [
        "read",
        "write",
        "execve",
        "exit_group",
        "clone",
        "futex",
        "mmap2",
    ] {
        if name == "mmap2" && !cfg!(target_arch = "arm") {
            continue;
        }
        assert!(syscalls::number(name).is_some(), "{name}");
    }
    assert_eq!(syscalls::number("no_such_call"), None);
}

#[test]
fn programs_survive_a_round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seccomp.bpf");
    let prog = compile(0).unwrap();
    prog.save(&path).unwrap();
    assert_eq!(Program::load(&path).unwrap(), prog);
    std::fs::write(&path, [0u8; 12]).unwrap();
    let err = Program::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("12 bytes, expected a non-empty multiple of 8"),
        "{err}"
    );
    std::fs::write(&path, []).unwrap();
    assert!(Program::load(&path).is_err());
}

//! The generated programs run by a small eBPF interpreter for exactly the
//! instructions the generator emits (anything else fails the test), against
//! what cgroup v1 would decide for the same rules.

use oci_spec::runtime::LinuxDeviceCgroupBuilder;

use super::*;

const CTX: u64 = 0xc7c7_0000;

/// Runs `program` for one device access as the kernel would: `r1` points
/// to `struct bpf_cgroup_dev_ctx`, the return value is `r0`. Also checks
/// what the verifier would: loads only from the context, only forward
/// jumps that stay in the program, an `exit` with `r0` set to 0 or 1.
fn run(program: &Program, kind: Kind, major: u32, minor: u32, access: u32) -> bool {
    let ctx = [access << 16 | kind as u32, major, minor];
    let insns = program.instructions();
    let mut r: [Option<u64>; 11] = [None; 11];
    r[1] = Some(CTX);
    let mut pc = 0;
    loop {
        let at = pc;
        let i = insns
            .get(at)
            .unwrap_or_else(|| panic!("ran off the end at {at}"));
        let (d, s) = (usize::from(i.dst()), usize::from(i.src()));
        let get = |r: &[Option<u64>; 11], n: usize| {
            r[n].unwrap_or_else(|| panic!("r{n} read before set at {at}"))
        };
        let imm = i.imm as i64 as u64;
        let target = |taken: bool| {
            assert!(i.off >= 0, "backward jump at {at}");
            if taken {
                at + 1 + i.off as usize
            } else {
                at + 1
            }
        };
        pc = at + 1;
        match i.code {
            LDX_W => {
                assert_eq!(get(&r, s), CTX, "load from a non-context register");
                assert!(i.off >= 0 && i.off % 4 == 0 && i.off < 12, "bad offset");
                r[d] = Some(u64::from(ctx[i.off as usize / 4]));
            }
            MOV32_X => r[d] = Some(get(&r, s) & 0xffff_ffff),
            AND32_K => r[d] = Some(u64::from(get(&r, d) as u32 & i.imm as u32)),
            RSH32_K => r[d] = Some(u64::from((get(&r, d) as u32) >> i.imm)),
            MOV64_K => r[d] = Some(imm),
            JNE_K => pc = target(get(&r, d) != imm),
            JEQ_K => pc = target(get(&r, d) == imm),
            EXIT => {
                let r0 = get(&r, 0);
                assert!(r0 <= 1, "returned {r0}");
                return r0 == 1;
            }
            other => panic!("opcode {other:#04x} is outside the emitted subset"),
        }
    }
}

fn rule(
    allow: bool,
    typ: &str,
    major: Option<i64>,
    minor: Option<i64>,
    access: &str,
) -> LinuxDeviceCgroup {
    let typ = match typ {
        "a" => LinuxDeviceType::A,
        "b" => LinuxDeviceType::B,
        "c" => LinuxDeviceType::C,
        "u" => LinuxDeviceType::U,
        _ => LinuxDeviceType::P,
    };
    let mut b = LinuxDeviceCgroupBuilder::default()
        .allow(allow)
        .typ(typ)
        .access(access);
    if let Some(m) = major {
        b = b.major(m);
    }
    if let Some(m) = minor {
        b = b.minor(m);
    }
    b.build().unwrap()
}

/// What spec.rs gives every unprivileged container.
fn deny_all() -> LinuxDeviceCgroup {
    LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .unwrap()
}

const KINDS: [Kind; 2] = [Kind::Block, Kind::Char];
const MAJORS: [u32; 9] = [0, 1, 4, 5, 8, 10, 136, 254, 4095];
const MINORS: [u32; 11] = [0, 1, 2, 3, 5, 7, 8, 9, 200, 201, 1 << 19];

#[test]
fn containers_get_the_allowlist_and_nothing_else() {
    let filter = Filter::for_container(&[deny_all()]).unwrap();
    assert!(!filter.allows_everything());
    let program = filter.program().unwrap();
    // The README's list, said independently of the generator.
    let listed = |kind: Kind, major: u32, minor: u32| {
        kind == Kind::Char
            && (major == 136
                || [
                    (1, 3),
                    (1, 5),
                    (1, 7),
                    (1, 8),
                    (1, 9),
                    (5, 0),
                    (5, 1),
                    (5, 2),
                    (10, 200),
                ]
                .contains(&(major, minor)))
    };
    let mut allowed = 0;
    let mut cases = 0;
    for kind in KINDS {
        for major in MAJORS {
            for minor in MINORS {
                for access in 1..=ACC_ALL {
                    let want = access == ACC_MKNOD || listed(kind, major, minor);
                    assert_eq!(
                        run(&program, kind, major, minor, access),
                        want,
                        "{kind:?} {major}:{minor} access {access:03b}"
                    );
                    cases += 1;
                    allowed += usize::from(want);
                }
            }
        }
    }
    // Both answers were exercised, many times each.
    assert!(allowed > 100 && cases - allowed > 100, "{allowed}/{cases}");
}

#[test]
fn privileged_containers_need_no_program() {
    let all = rule(true, "a", None, None, "rwm");
    let filter = Filter::for_container(&[all]).unwrap();
    assert!(filter.allows_everything());
    // Were it loaded anyway, it would allow everything.
    let program = filter.program().unwrap();
    assert_eq!(program.instructions().len(), 9);
    assert!(run(&program, Kind::Block, 8, 0, ACC_ALL));
    // No rule at all: what a v1 cgroup under the root has, every device.
    assert!(Filter::for_container(&[]).unwrap().allows_everything());
}

#[test]
fn a_deny_list_denies_any_overlap() {
    let rules = [
        rule(true, "a", None, None, "rwm"),
        rule(false, "c", Some(1), Some(4), "w"),
        rule(false, "b", Some(8), None, "rwm"),
        // libcgroups' allow of /dev/null, which comes after, takes this
        // back, as it would on v1.
        rule(false, "c", Some(1), Some(3), "rwm"),
    ];
    let program = Filter::for_container(&rules).unwrap().program().unwrap();
    let check = |kind, major, minor, access, want: bool| {
        assert_eq!(
            run(&program, kind, major, minor, access),
            want,
            "{kind:?} {major}:{minor} {access:03b}"
        );
    };
    check(Kind::Char, 1, 4, ACC_READ, true);
    check(Kind::Char, 1, 4, ACC_WRITE, false);
    check(Kind::Char, 1, 4, ACC_READ | ACC_WRITE, false);
    check(Kind::Block, 1, 4, ACC_WRITE, true);
    check(Kind::Char, 1, 3, ACC_READ | ACC_WRITE, true);
    check(Kind::Block, 8, 0, ACC_MKNOD, false);
    check(Kind::Block, 8, 17, ACC_READ, false);
    check(Kind::Block, 9, 0, ACC_READ, true);
    check(Kind::Char, 8, 0, ACC_READ, true);
}

#[test]
fn rules_combine_as_cgroup_v1_combines_them() {
    let rules = [
        deny_all(),
        // Wildcard minor, read only.
        rule(true, "b", Some(7), None, "r"),
        // Merged into one exception: rw.
        rule(true, "c", Some(4), Some(1), "r"),
        rule(true, "c", Some(4), Some(1), "w"),
        // Granted, then taken back in part: m is left.
        rule(true, "c", Some(4), Some(2), "rwm"),
        rule(false, "c", Some(4), Some(2), "rw"),
        // A deny of one device does not split a wildcard (nor in v1).
        rule(true, "c", Some(13), None, "r"),
        rule(false, "c", Some(13), Some(64), "r"),
        // Granted, then taken back whole.
        rule(true, "b", Some(9), Some(9), "rw"),
        rule(false, "b", Some(9), Some(9), "rwm"),
        // An empty access grants nothing.
        rule(true, "b", Some(11), Some(0), ""),
    ];
    let filter = Filter::for_container(&rules).unwrap();
    let program = filter.program().unwrap();
    let check = |kind, major, minor, access, want: bool| {
        assert_eq!(
            run(&program, kind, major, minor, access),
            want,
            "{kind:?} {major}:{minor} {access:03b}"
        );
    };
    check(Kind::Block, 7, 0, ACC_READ, true);
    check(Kind::Block, 7, 99, ACC_READ, true);
    check(Kind::Block, 7, 0, ACC_WRITE, false);
    check(Kind::Block, 7, 0, ACC_READ | ACC_WRITE, false);
    check(Kind::Char, 7, 0, ACC_READ, false);
    check(Kind::Char, 4, 1, ACC_READ | ACC_WRITE, true);
    check(Kind::Char, 4, 2, ACC_READ, false);
    check(Kind::Char, 4, 2, ACC_MKNOD, true);
    check(Kind::Char, 13, 64, ACC_READ, true);
    check(Kind::Block, 9, 9, ACC_READ, false);
    check(Kind::Block, 11, 0, ACC_READ, false);
    // A rule of type a starts over.
    let reset = [rule(true, "c", Some(4), Some(1), "rwm"), deny_all()];
    let program = Filter::for_container(&reset).unwrap().program().unwrap();
    assert!(!run(&program, Kind::Char, 4, 1, ACC_READ));
}

#[test]
fn bad_rules_are_refused_naming_the_rule() {
    let cases = [
        (
            rule(true, "p", None, None, "rwm"),
            "device rule 1: type \"p\" is not a, b or c",
        ),
        (
            rule(true, "u", Some(1), Some(3), "rwm"),
            "device rule 1: type \"u\"",
        ),
        (
            rule(true, "c", Some(1), Some(3), "rx"),
            "device rule 1: access \"rx\" is not made of r, w and m",
        ),
        (
            rule(true, "c", Some(-1), Some(3), "r"),
            "device rule 1: major -1 is out of range (expected 0 to 2147483647)",
        ),
        (
            rule(true, "c", Some(1), Some(1 << 31), "r"),
            "device rule 1: minor 2147483648 is out of range",
        ),
    ];
    for (bad, want) in cases {
        let err = Filter::for_container(&[deny_all(), bad])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{err:?} should start with {want:?}");
    }
}

#[test]
fn programs_survive_the_bundle_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let program = Filter::for_container(&[deny_all()])
        .unwrap()
        .program()
        .unwrap();
    program.save(&path).unwrap();
    assert_eq!(Program::load(&path).unwrap(), program);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        8 * program.instructions().len() as u64
    );
    for bad in [&b""[..], &[0u8; 12][..]] {
        std::fs::write(&path, bad).unwrap();
        let err = Program::load(&path).unwrap_err().to_string();
        assert!(err.contains("expected a non-empty multiple of 8"), "{err}");
    }
}

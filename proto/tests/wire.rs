//! Round trips, pinned bytes and fuzzed input for every wire message.

use flotilla_proto::*;
use proptest::prelude::*;

fn desired() -> DesiredState {
    DesiredState {
        node: "pi-1".into(),
        generation: 7,
        pods: vec![PodSpec {
            name: "web".into(),
            workload: "web".into(),
            restart_policy: RestartPolicy::OnFailure,
            containers: vec![ContainerSpec {
                name: "main".into(),
                image: "oci:/img:1".into(),
                command: vec!["sh".into()],
                args: vec!["-c".into(), "true".into()],
                env: vec![EnvVar {
                    name: "A".into(),
                    value: "b".into(),
                }],
                working_dir: Some("/".into()),
                resources: Resources {
                    cpu_millis: Some(500),
                    memory_bytes: Some(1 << 20),
                    pids: Some(64),
                },
            }],
        }],
    }
}

fn status() -> NodeStatus {
    NodeStatus {
        node: "pi-1".into(),
        instance: 0xfeed,
        seq: 3,
        observed_generation: 7,
        desired_error: None,
        info: NodeInfo {
            arch: "arm64".into(),
            os: "linux".into(),
            agent_version: "0.1.0".into(),
            labels: vec![Label {
                key: "site".into(),
                value: "shop1".into(),
            }],
            cpus: 4,
            memory_bytes: 1 << 30,
        },
        pods: vec![PodStatus {
            name: "web".into(),
            workload: "web".into(),
            generation: 7,
            phase: PodPhase::Running,
            message: None,
            containers: vec![
                ContainerStatus {
                    name: "main".into(),
                    state: ContainerState::Running {
                        started_at_ms: 1_700_000_000_000,
                    },
                    restarts: 1,
                },
                ContainerStatus {
                    name: "side".into(),
                    state: ContainerState::Terminated {
                        exit_code: 137,
                        reason: "OOMKilled".into(),
                        message: None,
                        finished_at_ms: 5,
                    },
                    restarts: 0,
                },
                ContainerStatus {
                    name: "init".into(),
                    state: ContainerState::Waiting {
                        reason: "ImageNotFound".into(),
                        message: Some("x".into()),
                    },
                    restarts: 0,
                },
            ],
        }],
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn round_trips() {
    let d = desired();
    assert_eq!(decode::<DesiredState>(&encode(&d).unwrap()).unwrap(), d);
    let s = status();
    assert_eq!(decode::<NodeStatus>(&encode(&s).unwrap()).unwrap(), s);
    for p in [
        Presence::Online {
            instance: 9,
            agent_version: "0.1.0".into(),
        },
        Presence::Offline,
    ] {
        assert_eq!(decode::<Presence>(&encode(&p).unwrap()).unwrap(), p);
    }
}

/// These bytes are the wire format: if this test fails, the change breaks
/// every deployed agent. Bump `WIRE_VERSION` instead of editing the bytes.
#[test]
fn golden_bytes() {
    assert_eq!(hex(&encode(&Presence::Offline).unwrap()), "0101");
    assert_eq!(
        hex(&encode(&Presence::Online {
            instance: 300,
            agent_version: "0.1".into()
        })
        .unwrap()),
        "0100ac0203302e31"
    );
    assert_eq!(
        hex(&encode(&desired()).unwrap()),
        "010470692d31070103776562037765620101046d61696e0a6f63693a2f696d673a3101027368\
         02022d630474727565010141016201012f01f403018080400140"
    );
    assert_eq!(
        hex(&encode(&status()).unwrap()),
        "010470692d31edfd030307000561726d3634056c696e757805302e312e30010473697465\
         0573686f70310480808080040103776562037765620701000304\
         6d61696e0180d095ffbc31010473696465029202094f4f4d4b696c6c6564000500\
         04696e6974000d496d6167654e6f74466f756e6401017800"
    );
}

#[test]
fn size_cap_checked_before_decoding() {
    let frame = vec![WIRE_VERSION; Presence::MAX_BYTES + 1];
    assert_eq!(
        decode::<Presence>(&frame),
        Err(DecodeError::TooLarge {
            message: "presence",
            len: 1025,
            max: 1024
        })
    );
    let mut big = desired();
    big.pods[0].containers[0].args = vec!["x".repeat(1024); 1100];
    assert!(matches!(encode(&big), Err(EncodeError::TooLarge { .. })));
}

#[test]
fn bad_frames_are_named() {
    assert_eq!(
        decode::<Presence>(&[]),
        Err(DecodeError::Empty {
            message: "presence"
        })
    );
    assert_eq!(
        decode::<Presence>(&[2, 1]),
        Err(DecodeError::UnsupportedVersion {
            message: "presence",
            version: 2
        })
    );
    assert_eq!(
        decode::<Presence>(&[1, 1, 0]),
        Err(DecodeError::TrailingBytes {
            message: "presence",
            count: 1
        })
    );
    let err = decode::<DesiredState>(&[1, 200]).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("desired state: malformed body"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode::<DesiredState>(&bytes);
        let _ = decode::<NodeStatus>(&bytes);
        let _ = decode::<Presence>(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(pos in 0usize..200, byte in any::<u8>()) {
        for mut frame in [encode(&desired()).unwrap(), encode(&status()).unwrap()] {
            let i = pos % frame.len();
            frame[i] = byte;
            let _ = decode::<DesiredState>(&frame);
            let _ = decode::<NodeStatus>(&frame);
        }
    }
}

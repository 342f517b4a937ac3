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
            termination_grace_secs: 30,
            volumes: vec![
                Volume {
                    name: "data".into(),
                    source: VolumeSource::HostPath {
                        path: "/srv".into(),
                    },
                },
                Volume {
                    name: "tmp".into(),
                    source: VolumeSource::Scratch,
                },
                Volume {
                    name: "conf".into(),
                    source: VolumeSource::Config {
                        files: vec![ConfigFile {
                            path: "a.conf".into(),
                            data: b"x=1".to_vec(),
                            mode: 0o644,
                        }],
                    },
                },
            ],
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
                volume_mounts: vec![VolumeMount {
                    name: "conf".into(),
                    mount_path: "/etc/app".into(),
                    read_only: true,
                }],
                liveness_probe: Some(Probe {
                    action: ProbeAction::Http {
                        port: 8080,
                        path: "/healthz".into(),
                    },
                    initial_delay_secs: 1,
                    period_secs: 10,
                    timeout_secs: 1,
                    success_threshold: 1,
                    failure_threshold: 3,
                }),
                readiness_probe: Some(Probe {
                    action: ProbeAction::Tcp { port: 8080 },
                    initial_delay_secs: 0,
                    period_secs: 5,
                    timeout_secs: 1,
                    success_threshold: 2,
                    failure_threshold: 1,
                }),
                startup_probe: Some(Probe {
                    action: ProbeAction::Exec {
                        command: vec!["true".into()],
                    },
                    initial_delay_secs: 0,
                    period_secs: 1,
                    timeout_secs: 1,
                    success_threshold: 1,
                    failure_threshold: 30,
                }),
                security_context: None,
            }],
            image_pull_secrets: vec![],
        }],
        prefetch: Vec::new(),
        prefetch_pull_secrets: Vec::new(),
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
            boot_id: "b00t".into(),
        },
        health: NodeHealth {
            memory_available_bytes: 1 << 29,
            disk_free_bytes: 1 << 33,
            disk_total_bytes: 1 << 34,
            load_milli: 250,
            uptime_secs: 3600,
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
                    ready: true,
                    pull: None,
                    next: Some(ContainerState::Waiting {
                        reason: "ErrImagePull".into(),
                        message: None,
                        retry_at_ms: None,
                    }),
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
                    ready: false,
                    pull: None,
                    next: None,
                },
                ContainerStatus {
                    name: "init".into(),
                    state: ContainerState::Waiting {
                        reason: "Pulling".into(),
                        message: Some("x".into()),
                        retry_at_ms: Some(7),
                    },
                    restarts: 0,
                    ready: false,
                    pull: Some(PullProgress {
                        done_bytes: 10,
                        total_bytes: 20,
                    }),
                    next: None,
                },
            ],
        }],
        prefetch: Vec::new(),
    }
}

fn rpc() -> (RpcRequest, RpcResponse, RpcResponse) {
    let request = RpcRequest {
        id: 42,
        call: RpcCall::Logs(LogsRequest {
            pod: "web".into(),
            container: "main".into(),
            tail_lines: Some(10),
            from: Some(LogCursor {
                file_id: 3,
                offset: 100,
            }),
            max_bytes: 65536,
        }),
    };
    let logs = RpcResponse {
        id: 42,
        result: RpcResult::Logs {
            data: b"hi\n".to_vec(),
            next: LogCursor {
                file_id: 3,
                offset: 103,
            },
        },
    };
    let error = RpcResponse {
        id: 43,
        result: RpcResult::Error {
            message: "no such pod".into(),
        },
    };
    (request, logs, error)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn round_trips() {
    let mut d = desired();
    assert_eq!(decode::<DesiredState>(&encode(&d).unwrap()).unwrap(), d);
    d.pods[0].containers[0].security_context = Some(SecurityContext {
        privileged: false,
        add_capabilities: vec!["NET_ADMIN".into()],
        drop_capabilities: vec!["ALL".into()],
        seccomp_unconfined: true,
        read_only_root_filesystem: true,
    });
    assert_eq!(decode::<DesiredState>(&encode(&d).unwrap()).unwrap(), d);
    let sealed = SealedSecret {
        name: "db".into(),
        digest: [1; 32],
        ephemeral_public: [2; 32],
        nonce: [3; 12],
        ciphertext: vec![4; 40],
        problem: None,
    };
    d.pods[0].volumes.push(Volume {
        name: "creds".into(),
        source: VolumeSource::Secret {
            items: vec![SecretItem {
                key: "password".into(),
                path: "pw".into(),
                mode: Some(0o400),
            }],
            default_mode: 0o644,
            sealed: sealed.clone(),
        },
    });
    d.pods[0].image_pull_secrets = vec![
        SealedSecret {
            name: "regcred".into(),
            ..sealed
        },
        SealedSecret {
            problem: Some("secret \"x\" not found".into()),
            ..SealedSecret::unsealed("x")
        },
    ];
    assert_eq!(decode::<DesiredState>(&encode(&d).unwrap()).unwrap(), d);
    let files = SecretFiles {
        files: vec![ConfigFile {
            path: "pw".into(),
            data: b"hunter2".to_vec(),
            mode: 0o400,
        }],
    };
    assert_eq!(
        decode::<SecretFiles>(&encode(&files).unwrap()).unwrap(),
        files
    );
    // The sealing context binds node, Secret and digest, unambiguously.
    assert_ne!(
        sealed_secret_context("ab", "c", &[0; 32]),
        sealed_secret_context("a", "bc", &[0; 32])
    );
    d.prefetch = vec!["registry.local:5000/app:2".into(), "oci:/img:2".into()];
    assert_eq!(decode::<DesiredState>(&encode(&d).unwrap()).unwrap(), d);
    d.prefetch_pull_secrets = vec![PrefetchPullSecrets {
        images: vec!["registry.local:5000/app:2".into()],
        pull_secrets: d.pods[0].image_pull_secrets.clone(),
    }];
    assert_eq!(decode::<DesiredState>(&encode(&d).unwrap()).unwrap(), d);
    let mut s = status();
    assert_eq!(decode::<NodeStatus>(&encode(&s).unwrap()).unwrap(), s);
    s.prefetch = vec![
        PrefetchStatus {
            image: "a:1".into(),
            state: PrefetchState::Queued,
        },
        PrefetchStatus {
            image: "a:2".into(),
            state: PrefetchState::Pulling {
                progress: PullProgress {
                    done_bytes: 5,
                    total_bytes: 9,
                },
            },
        },
        PrefetchStatus {
            image: "a:3".into(),
            state: PrefetchState::Ready,
        },
        PrefetchStatus {
            image: "a:4".into(),
            state: PrefetchState::Failed {
                reason: "ErrImagePull".into(),
                message: "down".into(),
                retry_at_ms: 7,
            },
        },
    ];
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
        "010470692d3107010377656203776562011e03046461746100042f73727603746d700104\
         636f6e66020106612e636f6e6603783d31a40301046d61696e0a6f63693a2f696d673a31\
         0102736802022d630474727565010141016201012f01f4030180804001400104636f6e66\
         082f6574632f617070010102903f082f6865616c74687a010a0101030101903f00050102\
         010100010474727565000101011e00000000"
    );
    assert_eq!(
        hex(&encode(&status()).unwrap()),
        "010470692d31edfd030307000561726d3634056c696e757805302e312e30010473697465\
         0573686f70310480808080040462303074808080800280808080208080808040fa01901c\
         01037765620377656207010003046d61696e0180d095ffbc3101010001000c457272496d\
         61676550756c6c00000473696465029202094f4f4d4b696c6c656400050000000004696e\
         6974000750756c6c696e6701017801070000010a140000"
    );
    let (request, logs, _) = rpc();
    assert_eq!(
        hex(&encode(&request).unwrap()),
        "012a0003776562046d61696e010a010364808004"
    );
    assert_eq!(hex(&encode(&logs).unwrap()), "012a000368690a0367");
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
        let _ = decode::<RpcRequest>(&bytes);
        let _ = decode::<RpcResponse>(&bytes);
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

fn signed() -> SignedDesired {
    let mut signature = [0u8; SIGNATURE_LEN];
    for (i, b) in signature.iter_mut().enumerate() {
        *b = i as u8;
    }
    SignedDesired {
        payload: vec![1, 2, 3],
        signature: Signature(signature),
    }
}

#[test]
fn signed_desired_round_trips_with_a_bare_64_byte_signature() {
    let s = signed();
    let frame = encode(&s).unwrap();
    assert_eq!(decode::<SignedDesired>(&frame).unwrap(), s);
    // Version, payload length, payload, then exactly 64 signature bytes.
    let signature: String = (0u8..64).map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex(&frame), format!("0103010203{signature}"));
    // The signed bytes are the context, then the payload as sent.
    assert_eq!(
        SignedDesired::signed_bytes(&[1, 2, 3]),
        b"flotilla desired state v1\0\x01\x02\x03".to_vec()
    );
    // A short signature is malformed, not zero-filled.
    let short = &frame[..frame.len() - 1];
    assert!(matches!(
        decode::<SignedDesired>(short),
        Err(DecodeError::Malformed { .. })
    ));
    // The envelope carries a whole desired state.
    let big = SignedDesired {
        payload: vec![0; DesiredState::MAX_BYTES],
        signature: Signature([0; SIGNATURE_LEN]),
    };
    assert!(encode(&big).is_ok());
}

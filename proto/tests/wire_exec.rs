//! Exec over rpc: round trips, pinned bytes, the caps (the largest request
//! and answer fit their frames), and fuzzed input.

use flotilla_proto::*;
use proptest::prelude::*;

fn request() -> ExecRequest {
    ExecRequest {
        node: "pi-1".into(),
        pod: "web".into(),
        container: "main".into(),
        argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
        timeout_ms: 30_000,
        issued_at_ms: 1_700_000_000_000,
        nonce: [7; 16],
    }
}

fn signed(payload: Vec<u8>) -> RpcRequest {
    RpcRequest {
        id: 42,
        call: RpcCall::Exec(SignedExec {
            payload,
            signature: Signature([9; SIGNATURE_LEN]),
        }),
    }
}

fn result() -> RpcResponse {
    RpcResponse {
        id: 42,
        result: RpcResult::Exec(ExecResult {
            end: ExecEnd::Exited(3),
            stdout: b"out\n".to_vec(),
            stderr: b"err\n".to_vec(),
            stdout_cut: 0,
            stderr_cut: 5,
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn round_trips() {
    let payload = encode(&request()).unwrap();
    assert_eq!(decode::<ExecRequest>(&payload).unwrap(), request());
    let frame = encode(&signed(payload.clone())).unwrap();
    let back = decode::<RpcRequest>(&frame).unwrap();
    assert_eq!(back, signed(payload));
    assert_eq!(
        decode::<RpcResponse>(&encode(&result()).unwrap()).unwrap(),
        result()
    );
    for end in [ExecEnd::Signaled(9), ExecEnd::TimedOut, ExecEnd::Exited(-1)] {
        let mut r = result();
        if let RpcResult::Exec(e) = &mut r.result {
            e.end = end;
        }
        assert_eq!(decode::<RpcResponse>(&encode(&r).unwrap()).unwrap(), r);
    }
}

/// The new variants come after the old ones: a logs request and answer
/// keep their bytes (pinned in wire.rs), and exec's tags are the next ones.
#[test]
fn pinned_bytes() {
    assert_eq!(
        hex(&encode(&request()).unwrap()),
        "010470692d3103776562046d61696e03027368022d6306657869742033b0ea0180d095\
         ffbc3107070707070707070707070707070707"
    );
    let frame = encode(&signed(vec![1, 2])).unwrap();
    // id 42, call tag 1 (Exec), payload of 2 bytes, 64 signature bytes.
    assert_eq!(hex(&frame[..6]), "012a01020102");
    assert_eq!(frame.len(), 6 + SIGNATURE_LEN);
    assert_eq!(
        hex(&encode(&result()).unwrap()),
        "012a020006046f75740a046572720a0005"
    );
}

#[test]
fn the_largest_request_and_answer_fit_their_frames() {
    let mut r = request();
    r.node = "n".repeat(MAX_NAME);
    r.pod = "p".repeat(MAX_NAME);
    r.container = "c".repeat(MAX_NAME);
    // 64 arguments of 31 bytes: 2048 bytes with their NULs.
    r.argv = vec!["a".repeat(31); ExecRequest::MAX_ARGS];
    assert_eq!(ExecRequest::argv_problem(&r.argv), None);
    r.timeout_ms = ExecRequest::MAX_TIMEOUT_MS;
    r.issued_at_ms = u64::MAX;
    let payload = encode(&r).unwrap();
    let mut frame = signed(payload);
    frame.id = u64::MAX;
    encode(&frame).unwrap();

    let answer = RpcResponse {
        id: u64::MAX,
        result: RpcResult::Exec(ExecResult {
            end: ExecEnd::Signaled(i32::MAX),
            stdout: vec![0xff; ExecRequest::MAX_OUTPUT],
            stderr: vec![0xff; ExecRequest::MAX_OUTPUT],
            stdout_cut: u64::MAX,
            stderr_cut: u64::MAX,
        }),
    };
    let bytes = encode(&answer).unwrap();
    assert!(
        bytes.len() < RpcResponse::MAX_BYTES / 2 + 64,
        "{}",
        bytes.len()
    );
}

#[test]
fn argument_caps() {
    let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(ExecRequest::argv_problem(&argv(&["ls", "-l"])), None);
    assert_eq!(ExecRequest::argv_problem(&[]), Some("empty command"));
    assert_eq!(
        ExecRequest::argv_problem(&argv(&["", "x"])),
        Some("empty command")
    );
    assert_eq!(
        ExecRequest::argv_problem(&vec!["a".to_string(); 65]),
        Some("more than 64 arguments")
    );
    assert_eq!(
        ExecRequest::argv_problem(&["a".repeat(1024), "b".repeat(1023)]),
        Some("arguments longer than 2048 bytes in all")
    );
    assert_eq!(
        ExecRequest::argv_problem(&argv(&["echo", "a\0b"])),
        Some("an argument contains a NUL byte")
    );
}

/// An exec signature and a desired-state signature never cover the same bytes.
#[test]
fn contexts_keep_signatures_apart() {
    let payload = encode(&request()).unwrap();
    let exec = SignedExec::signed_bytes(&payload);
    let desired = SignedDesired::signed_bytes(&payload);
    assert_ne!(exec, desired);
    assert!(exec.starts_with(SIGNED_EXEC_CONTEXT));
    assert!(exec.ends_with(&payload));
    assert!(!SIGNED_EXEC_CONTEXT.starts_with(SIGNED_DESIRED_CONTEXT));
    assert!(!SIGNED_DESIRED_CONTEXT.starts_with(SIGNED_EXEC_CONTEXT));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode::<ExecRequest>(&bytes);
        let _ = decode::<RpcRequest>(&bytes);
        let _ = decode::<RpcResponse>(&bytes);
    }

    #[test]
    fn mutated_exec_frames_never_panic(pos in 0usize..200, byte in any::<u8>()) {
        let payload = encode(&request()).unwrap();
        for mut frame in [payload.clone(), encode(&signed(payload)).unwrap(), encode(&result()).unwrap()] {
            let i = pos % frame.len();
            frame[i] = byte;
            let _ = decode::<ExecRequest>(&frame);
            let _ = decode::<RpcRequest>(&frame);
            let _ = decode::<RpcResponse>(&frame);
        }
    }
}

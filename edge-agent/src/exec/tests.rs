//! Judging exec requests: signature, node, window, replays, caps, slots;
//! and running them in the fake runtime's containers.

use std::path::PathBuf;

use flotilla_proto::{ExecEnd, Resources, SIGNATURE_LEN, SecurityContext, Signature, encode};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use super::*;
use crate::runtime::ContainerConfig;
use crate::runtime::fake::FakeRuntime;

fn key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn trust(key: &Ed25519KeyPair) -> Trust {
    Trust::Pinned(key.public_key().as_ref().try_into().unwrap())
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn request(node: &str, nonce: u8, issued: SystemTime) -> ExecRequest {
    ExecRequest {
        node: node.into(),
        pod: "web".into(),
        container: "main".into(),
        argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
        timeout_ms: 5_000,
        issued_at_ms: millis(issued),
        nonce: [nonce; 16],
    }
}

/// Signs the request's frame after `context`, as the controller does with
/// the exec context.
fn sign_with(key: &Ed25519KeyPair, context: &[u8], r: &ExecRequest) -> SignedExec {
    let payload = encode(r).unwrap();
    let mut message = context.to_vec();
    message.extend_from_slice(&payload);
    let signature = Signature(key.sign(&message).as_ref().try_into().unwrap());
    SignedExec { payload, signature }
}

fn sign(key: &Ed25519KeyPair, r: &ExecRequest) -> SignedExec {
    sign_with(key, flotilla_proto::SIGNED_EXEC_CONTEXT, r)
}

fn container(id: &str) -> ContainerConfig {
    ContainerConfig {
        id: id.into(),
        image_rootfs: PathBuf::from("/none"),
        args: vec!["serve".into()],
        env: Vec::new(),
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        hostname: "h".into(),
        resources: Resources::default(),
        log_path: PathBuf::from("/dev/null"),
        mounts: Vec::new(),
        security: SecurityContext::default(),
    }
}

fn execs(key: &Ed25519KeyPair) -> (Arc<FakeRuntime>, Execs<FakeRuntime>) {
    let runtime = Arc::new(FakeRuntime::new());
    let execs = Execs::new(Arc::clone(&runtime), "n1", &trust(key));
    (runtime, execs)
}

#[test]
fn a_signed_request_runs_once() {
    let k = key();
    let (runtime, execs) = execs(&k);
    runtime.start(&container("web.main.0123abcd")).unwrap();
    runtime.set_exec("sh -c exit 3", Some(3));
    let signed = sign(&k, &request("n1", 1, now()));
    let request = execs.judge(&signed, now(), Instant::now()).unwrap();
    let result = execs.run(&request).unwrap();
    assert_eq!(result.end, ExecEnd::Exited(3));
    assert_eq!(result.stdout, b"sh -c exit 3\n");
    assert_eq!(runtime.exec_count("sh -c exit 3"), 1);

    let again = execs.judge(&signed, now(), Instant::now()).unwrap_err();
    assert_eq!(
        again.to_string(),
        "refused exec request: already seen (a replay)"
    );
    assert_eq!(runtime.exec_count("sh -c exit 3"), 1);
}

#[test]
fn unsigned_forged_tampered_and_misdirected_requests_are_refused() {
    let k = key();
    let (_, execs) = execs(&k);
    let r = request("n1", 2, now());
    let judge = |s: &SignedExec| execs.judge(s, now(), Instant::now()).unwrap_err();

    let unsigned = SignedExec {
        payload: encode(&r).unwrap(),
        signature: Signature([0; SIGNATURE_LEN]),
    };
    assert!(matches!(judge(&unsigned), ExecError::BadSignature));
    assert!(matches!(judge(&sign(&key(), &r)), ExecError::BadSignature));
    let mut tampered = sign(&k, &r);
    let last = tampered.payload.len() - 17;
    tampered.payload[last] ^= 1;
    assert!(matches!(judge(&tampered), ExecError::BadSignature));
    // A signature made for a desired state is not one for an exec.
    let desired = sign_with(&k, flotilla_proto::SIGNED_DESIRED_CONTEXT, &r);
    assert!(matches!(judge(&desired), ExecError::BadSignature));

    let other = judge(&sign(&k, &request("n2", 3, now())));
    assert_eq!(
        other.to_string(),
        "refused exec request: meant for node \"n2\", this is \"n1\""
    );
    // None of them used up the nonce: the genuine request still runs.
    execs.judge(&sign(&k, &r), now(), Instant::now()).unwrap();
}

#[test]
fn requests_outside_the_window_are_refused() {
    let k = key();
    let (_, execs) = execs(&k);
    let t = now();
    // An agent up for longer than the window: only the window decides.
    let judge = |issued: SystemTime, nonce: u8| {
        let mono = Instant::now() + 2 * WINDOW;
        execs.judge(&sign(&k, &request("n1", nonce, issued)), t, mono)
    };
    let old = judge(t - WINDOW - Duration::from_secs(2), 1).unwrap_err();
    assert_eq!(
        old.to_string(),
        "refused exec request: issued 302 s behind this node's clock, over the 300 s allowed (expired, or the clocks differ)"
    );
    let ahead = judge(t + WINDOW + Duration::from_secs(1), 2).unwrap_err();
    assert!(ahead.to_string().contains("301 s ahead of"), "{ahead}");
    judge(t - WINDOW + Duration::from_secs(1), 3).unwrap();
    judge(t + WINDOW - Duration::from_secs(1), 4).unwrap();
}

/// Nonces live in memory: after a restart, a request issued before the
/// agent started may have run, and is refused even inside the window.
#[test]
fn requests_issued_before_the_agent_started_are_refused() {
    let k = key();
    let (_, execs) = execs(&k);
    let t = now();
    let up_a_minute = Instant::now() + Duration::from_secs(60);
    let judge = |issued: SystemTime, nonce: u8| {
        execs.judge(&sign(&k, &request("n1", nonce, issued)), t, up_a_minute)
    };
    // Issued 90 s ago, within the window, but before the start 60 s ago.
    let before = judge(t - Duration::from_secs(90), 1).unwrap_err();
    assert!(matches!(before, ExecError::BeforeStart), "{before}");
    assert!(before.to_string().contains("send it again"), "{before}");
    // Issued after the start: runs.
    judge(t - Duration::from_secs(30), 2).unwrap();
}

#[test]
fn nonces_are_bounded_and_forgotten_after_two_windows() {
    let k = key();
    let (_, execs) = execs(&k);
    let t0 = Instant::now();
    for i in 0..MAX_SEEN {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
        execs.remember(nonce, t0).unwrap();
    }
    let full = execs
        .judge(&sign(&k, &request("n1", 0xee, now())), now(), t0)
        .unwrap_err();
    assert!(matches!(full, ExecError::TooMany), "{full}");
    // Refused as too many, not recorded: it runs once room is made.
    let later = t0 + 2 * WINDOW + Duration::from_secs(1);
    execs
        .judge(&sign(&k, &request("n1", 0xee, now())), now(), later)
        .unwrap();
    assert_eq!(execs.seen.lock().unwrap().len(), 1);
}

#[test]
fn checks_of_what_is_signed() {
    let k = key();
    let (_, execs) = execs(&k);
    let judge = |r: ExecRequest| {
        execs
            .judge(&sign(&k, &r), now(), Instant::now())
            .unwrap_err()
            .to_string()
    };
    let mut r = request("n1", 5, now());
    r.pod = "../etc".into();
    assert!(
        judge(r).starts_with("refused exec request: pod \"../etc\": "),
        "a path in a pod name"
    );
    let mut r = request("n1", 6, now());
    r.argv = Vec::new();
    assert_eq!(judge(r), "refused exec request: command: empty command");
    let mut r = request("n1", 7, now());
    r.timeout_ms = ExecRequest::MAX_TIMEOUT_MS + 1;
    assert_eq!(
        judge(r),
        "refused exec request: timeout of 300001 ms (expected 1 to 300000 ms)"
    );
    let bad = SignedExec {
        payload: vec![1, 200],
        signature: sign(&k, &request("n1", 8, now())).signature,
    };
    assert!(matches!(
        execs.judge(&bad, now(), Instant::now()),
        Err(ExecError::BadSignature)
    ));
}

#[test]
fn an_agent_without_a_pinned_key_runs_nothing() {
    let k = key();
    let execs = Execs::new(Arc::new(FakeRuntime::new()), "n1", &Trust::Unverified);
    let e = execs
        .judge(&sign(&k, &request("n1", 1, now())), now(), Instant::now())
        .unwrap_err();
    assert!(matches!(e, ExecError::NoKey), "{e}");
}

#[test]
fn at_most_four_run_at_once() {
    let (_, execs) = execs(&key());
    let slots: Vec<_> = (0..MAX_RUNNING).map(|_| execs.slot().unwrap()).collect();
    let busy = execs.slot().err().unwrap();
    assert_eq!(
        busy.to_string(),
        "busy: 4 commands already run on this node; try again"
    );
    drop(slots);
    execs.slot().unwrap();
}

#[test]
fn containers_are_found_by_pod_and_name_and_must_run() {
    let k = key();
    let (runtime, execs) = execs(&k);
    let r = request("n1", 9, now());
    let e = execs.run(&r).unwrap_err();
    assert_eq!(e.to_string(), "pod web has no container main on this node");
    // Another pod whose name starts the same is not it.
    runtime.start(&container("web2.main.0000aaaa")).unwrap();
    assert!(matches!(execs.run(&r), Err(ExecError::NoContainer { .. })));
    runtime.start(&container("web.main.0123abcd")).unwrap();
    runtime.kill("web.main.0123abcd", libc::SIGKILL).unwrap();
    let e = execs.run(&r).unwrap_err();
    assert_eq!(e.to_string(), "container main of pod web is not running");
    // A replacement that runs beside the exited one is chosen.
    runtime.start(&container("web.main.4567cdef")).unwrap();
    runtime.set_exec("sh -c exit 3", None);
    assert_eq!(execs.run(&r).unwrap().end, ExecEnd::TimedOut);
}

#[tokio::test]
async fn refusals_are_answered_with_the_reason() {
    let k = key();
    let (_, execs) = execs(&k);
    let execs = Arc::new(execs);
    let forged = sign(&key(), &request("n1", 1, now()));
    let answer = serve(Arc::clone(&execs), 7, forged).await;
    assert_eq!(answer.id, 7);
    assert!(
        matches!(&answer.result, RpcResult::Error { message } if message.contains("bad signature")),
        "{answer:?}"
    );
    let answer = serve(execs, 8, sign(&k, &request("n1", 2, now()))).await;
    assert!(
        matches!(&answer.result, RpcResult::Error { message } if message == "pod web has no container main on this node"),
        "{answer:?}"
    );
}

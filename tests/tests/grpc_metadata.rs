//! Large gRPC metadata through the router, with real grpcio peers whose
//! header list limit is grpc-go's default (16 MiB): tokens and trace
//! baggage of tens of KiB pass as they would at L4, and a list over the
//! router's limit fails that RPC alone with RESOURCE_EXHAUSTED, as a gRPC
//! server would answer it, not the whole channel.

use std::process::Command;

use balancer_tests::grpc::{PEER, setup};
use serde_json::Value;

const PORT: u16 = 50057;
const VIP: &str = "198.19.0.77";

#[test]
fn metadata_up_to_60_kib_passes_and_a_larger_list_fails_only_its_rpc() {
    let (t, _servers, _agent) = setup("grpcmeta", VIP, PORT, &[], &[]);
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 {PEER} metadata {VIP}:80 1 9 16 40 60 70 1",
        t.cgroup.path.display(),
        t.client.name,
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("grpc client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    let calls = v["calls"].as_array().expect("calls");
    for c in calls {
        let kib = c["kib"].as_u64().expect("kib");
        if kib <= 60 {
            assert_eq!(c["code"], "OK", "{kib} KiB of metadata: {v}");
            assert_eq!(
                c["seen"].as_u64(),
                Some(kib * 1024),
                "the pod got the whole field: {v}"
            );
        } else {
            assert_eq!(
                c["code"], "RESOURCE_EXHAUSTED",
                "{kib} KiB is over the router's 64 KiB list: refused as a gRPC server would: {v}"
            );
        }
    }
    assert_eq!(calls.len(), 7, "{v}");
    assert_eq!(
        v["after"], "OK",
        "the channel's connection survived the refusal: {v}"
    );
}

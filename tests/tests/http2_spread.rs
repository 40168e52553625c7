//! The headline: every RPC of ONE HTTP/2 connection spread over all pods.
//! Its own test binary, so it does not share the CPUs with the other tests:
//! least-request rightly sends less to a pod that is slower at the moment.

mod common;

use common::{VIP, no_errors, pods_of, setup};

#[test]
fn one_connection_10k_unary_rpcs_spread_within_5_percent() {
    let s = setup("h2spread", 4);
    let v = s.client(&[
        "--path",
        "/unary",
        "--requests",
        "10000",
        "--concurrency",
        "32",
    ]);
    no_errors(&v);
    let pods = pods_of(&v);
    assert_eq!(pods.len(), 4, "{v}");
    for (pod, n) in &pods {
        assert!((2375..=2625).contains(n), "{pod} got {n} of 10000: {v}");
    }
    assert_eq!(
        v["peer"], VIP,
        "getpeername on the steered connection returns the VIP"
    );
    // The agent's view: streams per endpoint, and a latency estimate.
    let e = s.agent.endpoints_json().expect("json");
    let eps = e["services"][0]["endpoints"].as_array().expect("eps");
    let total: u64 = eps
        .iter()
        .map(|e| e["streams_total"].as_u64().expect("streams_total"))
        .sum();
    assert_eq!(total, 10000, "{e}");
    assert!(eps.iter().all(|e| e["ewma_us"].as_u64().expect("ewma") > 0));
    assert_eq!(
        s.agent.status_json().expect("status")["counters"]["steered"],
        1
    );
}

//! The router against hostile clients, with well-behaved ones beside them:
//! malformed header blocks, frames and requests cost only the connection
//! that sent them (with the RFC's error code), known attacks are answered
//! with GOAWAY ENHANCE_YOUR_CALM, clients that never read cannot make the
//! agent hold unbounded memory, streams nobody answers are reset, and a
//! backend that never finishes its handshake is given up.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::Agent,
    h2wire::{
        self as w,
        code::{self, *},
    },
    netns::link_tx_bytes,
    nghttp2::{H2load, h2load_spawn, h2load_wait},
    peers::{
        H2_PORT, H2Hold, H2Server, h2_client_spawn, h2_client_wait_timeout, h2_hostile, h2_raw,
    },
    process::{raise_nofile_limit, require_root},
    topology::{ROUTER_ADDR, Topology},
};
use common::{VIP, http2_yaml, no_errors, pods_of, setup_with};
use serde_json::Value;

/// What the router must answer to one hostile case, on the hostile
/// client's own connection.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Odd but valid: served (a response), no GOAWAY, no RST_STREAM.
    Served,
    /// A connection error (RFC 9113 5.4.1): GOAWAY with this code.
    Conn(u32),
    /// A stream error (RFC 9113 5.4.2): RST_STREAM with this code while the
    /// connection goes on (a PING sent after the case is still answered),
    /// or, as RFC 9113 5.4 lets an endpoint do, the same code as a
    /// connection error.
    Stream(u32),
    /// A known attack: GOAWAY ENHANCE_YOUR_CALM (0xb).
    Calm,
}

use Expect::*;

/// How many times the hostile client runs the whole list.
const PASSES: usize = 3;

/// Every case `lbt-h2 hostile` sends (`balancer_tests::h2wire::cases`
/// builds the bytes) and what RFC 9113 / RFC 7541 or the design demand.
const CASES: &[(&str, Expect)] = &[
    ("control-plain-request", Served),
    ("control-plain-request-pre-ack", Served),
    ("control-valid-huffman", Served),
    // Unknown frame types and settings are ignored (4.1, 6.5.2).
    ("control-unknown-frame-type-and-setting", Served),
    ("control-split-header-block", Served),
    // A header block that cannot be decoded: COMPRESSION_ERROR (4.3).
    ("hpack-huffman-padding-too-long", Conn(COMPRESSION_ERROR)),
    (
        "hpack-huffman-padding-too-long-pre-ack",
        Conn(COMPRESSION_ERROR),
    ),
    ("hpack-huffman-padding-not-ones", Conn(COMPRESSION_ERROR)),
    ("hpack-huffman-eos", Conn(COMPRESSION_ERROR)),
    ("hpack-huffman-eos-pre-ack", Conn(COMPRESSION_ERROR)),
    ("hpack-huffman-bad-name", Conn(COMPRESSION_ERROR)),
    ("hpack-dynamic-table-index", Conn(COMPRESSION_ERROR)),
    ("hpack-dynamic-table-index-pre-ack", Conn(COMPRESSION_ERROR)),
    ("hpack-dynamic-table-name", Conn(COMPRESSION_ERROR)),
    ("hpack-index-zero", Conn(COMPRESSION_ERROR)),
    (
        "hpack-table-size-update-above-zero",
        Conn(COMPRESSION_ERROR),
    ),
    (
        "hpack-table-size-update-after-field",
        Conn(COMPRESSION_ERROR),
    ),
    ("hpack-integer-overflow", Conn(COMPRESSION_ERROR)),
    ("hpack-truncated-literal", Conn(COMPRESSION_ERROR)),
    // Frames (section numbers of RFC 9113).
    ("data-on-stream-0", Conn(PROTOCOL_ERROR)),    // 6.1
    ("headers-on-stream-0", Conn(PROTOCOL_ERROR)), // 6.2
    ("headers-even-stream-id", Conn(PROTOCOL_ERROR)), // 5.1.1
    ("headers-lower-stream-id", Conn(PROTOCOL_ERROR)), // 5.1.1
    ("headers-padding-too-long", Conn(PROTOCOL_ERROR)), // 6.2
    ("data-padding-too-long", Conn(PROTOCOL_ERROR)), // 6.1
    ("headers-larger-than-max-frame-size", Conn(FRAME_SIZE_ERROR)), // 4.2
    ("data-larger-than-max-frame-size", Stream(FRAME_SIZE_ERROR)), // 4.2
    ("ping-length-not-8", Conn(FRAME_SIZE_ERROR)), // 6.7
    ("settings-length-not-multiple-of-6", Conn(FRAME_SIZE_ERROR)), // 6.5
    ("settings-ack-with-payload", Conn(FRAME_SIZE_ERROR)), // 6.5
    ("settings-on-a-stream", Conn(PROTOCOL_ERROR)), // 6.5
    ("settings-enable-push-2", Conn(PROTOCOL_ERROR)), // 6.5.2
    (
        "settings-initial-window-above-max",
        Conn(FLOW_CONTROL_ERROR),
    ), // 6.5.2
    ("settings-max-frame-size-too-small", Conn(PROTOCOL_ERROR)), // 6.5.2
    ("rst-stream-length-not-4", Conn(FRAME_SIZE_ERROR)), // 6.4
    ("rst-stream-on-idle-stream", Conn(PROTOCOL_ERROR)), // 6.4
    ("window-update-length-not-4", Conn(FRAME_SIZE_ERROR)), // 6.9
    ("window-update-zero-on-connection", Conn(PROTOCOL_ERROR)), // 6.9
    ("window-update-zero-on-stream", Stream(PROTOCOL_ERROR)), // 6.9
    ("window-update-on-idle-stream", Conn(PROTOCOL_ERROR)), // 5.1
    ("connection-window-overflow", Conn(FLOW_CONTROL_ERROR)), // 6.9.1
    ("stream-window-overflow", Stream(FLOW_CONTROL_ERROR)), // 6.9.1
    ("priority-length-not-5", Stream(FRAME_SIZE_ERROR)), // 6.3
    ("priority-depends-on-itself", Stream(PROTOCOL_ERROR)), // 5.3.1
    ("headers-priority-depends-on-itself", Stream(PROTOCOL_ERROR)), // 5.3.1
    ("continuation-on-another-stream", Conn(PROTOCOL_ERROR)), // 6.10
    ("continuation-without-headers", Conn(PROTOCOL_ERROR)), // 6.10
    ("continuation-after-end-headers", Conn(PROTOCOL_ERROR)), // 6.10
    ("frame-inside-a-header-block", Conn(PROTOCOL_ERROR)), // 6.10
    ("data-on-idle-stream", Conn(PROTOCOL_ERROR)), // 5.1
    ("data-after-end-stream", Stream(STREAM_CLOSED)), // 5.1
    ("headers-after-end-stream", Stream(STREAM_CLOSED)), // 5.1
    ("data-after-rst-stream", Stream(STREAM_CLOSED)), // 5.1
    ("push-promise-from-a-client", Conn(PROTOCOL_ERROR)), // 8.4
    // Malformed requests: a stream error of type PROTOCOL_ERROR (8.1.1).
    ("request-uppercase-header-name", Stream(PROTOCOL_ERROR)), // 8.2.1
    ("request-connection-header", Stream(PROTOCOL_ERROR)),     // 8.2.2
    ("request-te-gzip", Stream(PROTOCOL_ERROR)),               // 8.2.2
    ("request-missing-path", Stream(PROTOCOL_ERROR)),          // 8.3.1
    ("request-empty-path", Stream(PROTOCOL_ERROR)),            // 8.3.1
    ("request-duplicate-path", Stream(PROTOCOL_ERROR)),        // 8.3.1
    (
        "request-pseudo-header-after-regular",
        Stream(PROTOCOL_ERROR),
    ), // 8.3
    ("request-unknown-pseudo-header", Stream(PROTOCOL_ERROR)), // 8.3
    ("request-response-pseudo-header", Stream(PROTOCOL_ERROR)), // 8.3
    ("request-content-length-mismatch", Stream(PROTOCOL_ERROR)), // 8.1.1
    // Attacks: each costs only its own connection.
    ("attack-rapid-reset", Calm), // CVE-2023-44487
    ("attack-continuation-flood", Calm),
    ("attack-continuation-flood-tiny", Calm),
    ("attack-settings-flood", Calm),
    ("attack-ping-flood", Calm),
    ("attack-empty-data-flood", Calm),
    ("attack-window-update-flood", Calm),
    ("attack-priority-flood", Calm),
    ("attack-header-list-bomb-literal", Calm),
    ("attack-header-list-bomb-indexed", Calm),
    ("attack-made-you-reset-window-overflow", Calm), // CVE-2025-8671
    ("attack-made-you-reset-data-after-end-stream", Calm),
    ("attack-made-you-reset-window-update-zero", Calm),
];

/// Whether one observation of `lbt-h2 hostile` meets `expect`; the reason
/// if not.
fn check(expect: Expect, r: &Value) -> Result<(), String> {
    if let Some(e) = r["error"].as_str() {
        return Err(format!("the case did not run: {e}"));
    }
    let goaway = r["goaway"].as_u64().map(|c| c as u32);
    let rst_codes: Vec<u32> = r["rsts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p[1].as_u64())
                .map(|c| c as u32)
                .collect()
        })
        .unwrap_or_default();
    let probe = r["probe_answered"] == true;
    let got = || {
        format!(
            "got GOAWAY {}, RST_STREAM {:?}, {} responses, probe PING {}, closed {}",
            goaway.map_or("none".into(), |c| format!("{c:#x} {}", code::name(c))),
            rst_codes,
            r["responses"],
            if probe { "answered" } else { "unanswered" },
            r["closed"],
        )
    };
    let ok = match expect {
        Served => goaway.is_none() && rst_codes.is_empty() && r["responses"].as_u64() > Some(0),
        Conn(c) => goaway == Some(c),
        Stream(c) => goaway == Some(c) || (goaway.is_none() && rst_codes.contains(&c) && probe),
        Calm => goaway == Some(ENHANCE_YOUR_CALM),
    };
    if ok {
        Ok(())
    } else {
        let want = match expect {
            Served => "a response and no error".to_owned(),
            Conn(c) => format!("GOAWAY {c:#x} {}", code::name(c)),
            Stream(c) => format!("RST_STREAM (or GOAWAY) {c:#x} {}", code::name(c)),
            Calm => "GOAWAY 0xb ENHANCE_YOUR_CALM".to_owned(),
        };
        Err(format!("want {want}; {}", got()))
    }
}

#[test]
fn hostile_client_beside_h2load_costs_the_good_client_nothing() {
    require_root();
    // Real peers nobody here wrote: nghttpd pods, h2load as the good client.
    let t = Topology::new("h2hostile", 4, &[]).expect("topology");
    let _nghttpd = t.start_nghttpd(H2_PORT).expect("nghttpd");
    let all: Vec<usize> = (0..4).collect();
    let mut agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &http2_yaml(&t, &all),
        Some(&t.node.name),
        &["--proxy-addr", ROUTER_ADDR],
    )
    .expect("agent");
    let (ns, cg) = (&t.client.name, Some(t.cgroup.path.as_path()));
    let url = format!("http://{VIP}/index");
    // The good client: h2load runs of 2 s back to back, from before the
    // hostile client starts until after it is done.
    let hostile_done = Arc::new(AtomicBool::new(false));
    let good = {
        let (ns, cg, url, done) = (
            ns.clone(),
            t.cgroup.path.clone(),
            url.clone(),
            hostile_done.clone(),
        );
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let args = ["-D", "2", "-c", "4", "-m", "16", &url];
                runs.push(h2load_spawn(&ns, Some(&cg), &args).and_then(h2load_wait));
            }
            runs
        })
    };
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    let passes = PASSES.to_string();
    // Every case three times over (each run on its own connection, 12 at
    // a time): what a hostile client's connections make the router send
    // to the shared pod connections adds up, as with a real attacker.
    let mut args: Vec<&str> = vec![
        "--path",
        "/index",
        "--parallel",
        "12",
        "--passes",
        &passes,
        "--wait-ms",
        "2500",
    ];
    for (name, _) in CASES {
        args.extend(["--case", name]);
    }
    let v = h2_hostile(ns, cg, VIP, &args).expect("lbt-h2 hostile");
    let hostile_s = started.elapsed().as_secs_f64();
    hostile_done.store(true, Ordering::SeqCst);
    let good: Vec<H2load> = good
        .join()
        .expect("h2load thread")
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .expect("h2load");

    let results = v["results"].as_array().expect("results");
    let mut failures = Vec::new();
    eprintln!("hostile cases ({hostile_s:.1} s):");
    for (name, expect) in CASES {
        let runs: Vec<&Value> = results.iter().filter(|r| r["name"] == *name).collect();
        if runs.len() != PASSES {
            failures.push(format!("{name}: {} results, want {PASSES}", runs.len()));
        }
        for r in runs {
            let verdict = check(*expect, r);
            if verdict.is_ok() && r["pass"] != 0 {
                continue;
            }
            eprintln!(
                "  {:<48} {:<4} goaway={:<6} last={} rst={} {} responses={} probe={} ({} ms)",
                name,
                if verdict.is_ok() { "ok" } else { "FAIL" },
                r["goaway_name"].as_str().unwrap_or("-"),
                r["goaway_last_stream"],
                r["rst_count"],
                r["rsts"].as_array().map_or(String::new(), |a| {
                    a.iter()
                        .take(2)
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                }),
                r["responses"],
                r["probe_answered"],
                r["ms"],
            );
            if let Err(why) = verdict {
                failures.push(format!("{name} (pass {}): {why}", r["pass"]));
            }
        }
    }
    // The header-list bombs are measured against a limit the router
    // announces; gRPC's default metadata limit (8 KiB, hard 16 KiB) fits.
    let advertised = &results[0]["router_settings"];
    match advertised[w::setting::MAX_HEADER_LIST_SIZE.to_string()].as_u64() {
        Some(n) if n >= 16 << 10 => {}
        other => failures.push(format!(
            "router SETTINGS_MAX_HEADER_LIST_SIZE: want >= 16384, got {other:?} ({advertised})"
        )),
    }
    // The good client saw none of it: every request of every run succeeded.
    let sum = |f: fn(&H2load) -> u64| good.iter().map(f).sum::<u64>();
    eprintln!(
        "h2load beside them ({} runs): {} done, {} succeeded, {} failed, {} errored, {} timeout, \
         {} 2xx",
        good.len(),
        sum(|r| r.done),
        sum(|r| r.succeeded),
        sum(|r| r.failed),
        sum(|r| r.errored),
        sum(|r| r.timeout),
        sum(|r| r.status_2xx),
    );
    for r in &good {
        if r.failed != 0 || r.errored != 0 || r.timeout != 0 || r.status_2xx != r.succeeded {
            failures.push(format!(
                "h2load beside the hostile client: want 0 failed, 0 errored, 0 timeout, all 2xx: {}",
                r.summary()
            ));
        }
    }
    if sum(|r| r.succeeded) < 1000 {
        failures.push(format!(
            "h2load beside the hostile client completed only {} requests",
            sum(|r| r.succeeded)
        ));
    }
    // The agent lived through it and still serves.
    if agent.running() {
        let after = h2load_wait(
            h2load_spawn(ns, cg, &["-n", "2000", "-c", "2", "-m", "16", &url]).expect("h2load"),
        )
        .expect("h2load after");
        if after.succeeded != 2000 || after.status_2xx != 2000 {
            failures.push(format!(
                "h2load after the hostile client: {}",
                after.summary()
            ));
        }
    } else {
        failures.push(format!("the agent died: {}", log_tail(&agent)));
    }
    assert!(
        failures.is_empty(),
        "{} failures ({} cases x {PASSES} passes, then the good client's checks):\n  {}",
        failures.len(),
        CASES.len(),
        failures.join("\n  ")
    );
}

/// What one client connection may make the router hold of responses it
/// does not read (`--client-buffer`, default 4 MiB), and what all of them
/// together may (`--router-buffer-limit`, default 256 MiB). The agent runs
/// with its defaults.
const CLIENT_BUFFER: u64 = 4 << 20;
const ROUTER_BUFFER_LIMIT: u64 = 256 << 20;
/// The agent's own cost of one client connection that holds no response
/// data: its read buffer (a frame of at most the default 16 KiB
/// SETTINGS_MAX_FRAME_SIZE plus header), the output buffer it writes from
/// (holding control frames only; response data is in CLIENT_BUFFER), and
/// the connection's and its tasks' state. Measured on the router of
/// December 2026: 1000 connections that only did the handshake (or one
/// small request each) grew its RSS by 15-17 MiB, about 16 KiB each; 64 KiB
/// leaves room for a read buffer of a whole frame and an output buffer.
const PER_CONNECTION: u64 = 64 << 10;
/// Not per connection: allocator slack, the pooled backend connections'
/// own buffers, the runtime.
const FIXED: u64 = 32 << 20;

/// Streams each connection that never reads opens.
const STREAMS_PER_CONNECTION: u64 = 4;
/// The window every stream has from its start whatever the budgets say
/// (`BACKEND_INITIAL_WINDOW`, README "bounded memory").
const STREAM_FLOOR: u64 = 16 << 10;

/// The most the router may hold for `n` connections that never read, by
/// its own count (`balancer_router_held_bytes`): the budgets, plus each
/// stream's floor.
fn held_bound(n: u64) -> u64 {
    (n * CLIENT_BUFFER).min(ROUTER_BUFFER_LIMIT) + n * STREAMS_PER_CONNECTION * STREAM_FLOOR
}

/// The most the agent's RSS may grow for `n` connections that never read.
fn bound(n: u64) -> u64 {
    held_bound(n) + n * PER_CONNECTION + FIXED
}

/// The router's `balancer_router_held_bytes` gauge (updated every 500 ms).
fn router_held(t: &Topology) -> u64 {
    let m = t
        .node
        .exec("curl", &["-s", &format!("http://{METRICS}/metrics")])
        .expect("metrics");
    m.lines()
        .find_map(|l| l.strip_prefix("balancer_router_held_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no balancer_router_held_bytes in {m}"))
}

const METRICS: &str = "198.18.0.1:9100";

/// The last lines of the agent's log, for a failure message.
fn log_tail(agent: &Agent) -> String {
    let log = agent.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn pods_tx(t: &Topology) -> u64 {
    t.pods
        .iter()
        .map(|p| link_tx_bytes(&p.ns.name, "eth0").expect("tx bytes"))
        .sum()
}

/// Watch the router's RSS until the pods stop sending (the windows the
/// router granted are used up), at most `max`; stops early once the
/// growth over `base` exceeds `limit`. Returns the peak growth.
fn settle(agent: &Agent, t: &Topology, base: u64, limit: u64, max: Duration) -> u64 {
    let start = Instant::now();
    let mut peak = 0;
    let mut tx: Vec<(Instant, u64)> = Vec::new();
    loop {
        let rss = agent.router_rss_bytes().expect("router rss");
        peak = peak.max(rss.saturating_sub(base));
        if peak > limit {
            return peak;
        }
        let now = Instant::now();
        tx.push((now, pods_tx(t)));
        let quiet = tx
            .iter()
            .find(|(at, _)| now.duration_since(*at) <= Duration::from_secs(2))
            .is_some_and(|(at, old)| {
                now.duration_since(*at) >= Duration::from_millis(1500)
                    && tx.last().map_or(0, |l| l.1) - old < 1 << 20
            });
        if (quiet && start.elapsed() > Duration::from_secs(3)) || start.elapsed() > max {
            return peak;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn thousand_connections_that_never_read_hold_bounded_memory() {
    require_root();
    let nofile = raise_nofile_limit().expect("nofile");
    assert!(
        nofile >= 4096,
        "open-file hard limit {nofile}: too low for 1000 connections"
    );
    let s = setup_with("h2hold", 4, &["--router-metrics-addr", METRICS]);
    let pid = s.agent.router_pid().expect("pid");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .expect("comm")
            .trim(),
        "balancer-agent",
        "the pid measured is the router's"
    );
    // Warm up: the router thread and its pooled backend connections exist.
    no_errors(&s.client(&["--path", "/unary", "--requests", "40", "--concurrency", "4"]));
    std::thread::sleep(Duration::from_millis(300));
    let base = s.agent.router_rss_bytes().expect("rss");
    let (ns, cg) = (&s.t.client.name, Some(s.t.cgroup.path.as_path()));
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let downloads = || -> u64 {
        s.t.pods
            .iter()
            .map(|p| p.h2.as_ref().expect("h2").count("req /download") as u64)
            .sum()
    };
    let mut failures = Vec::new();
    let mut held = Vec::new();
    let mut total = 0u64;
    // First a few (the per-connection bound decides), then up to 1000
    // (the node-wide cap decides).
    for n in [25u64, 975] {
        let tx0 = pods_tx(&s.t);
        // 8 MiB per stream, 4 streams per connection: far more than any bound.
        let h = H2Hold::start(
            ns,
            cg,
            VIP,
            &[
                "--connections",
                &n.to_string(),
                "--streams",
                &STREAMS_PER_CONNECTION.to_string(),
                "--path",
                "/download?bytes=8388608",
                "--rcvbuf",
                "4096",
            ],
        )
        .expect("lbt-h2 hold");
        assert_eq!(
            h.report["connections"], n,
            "all connections opened: {}",
            h.report
        );
        held.push(h);
        total += n;
        // Not vacuous: every stream reached a pod (the router forwards the
        // requests and bounds the responses through the windows it grants).
        let streams = total * STREAMS_PER_CONNECTION;
        if Topology::wait_for(
            "every stream to reach a pod",
            Duration::from_secs(10),
            || Ok(downloads() >= streams),
        )
        .is_err()
        {
            failures.push(format!(
                "{total} connections: only {} of their {streams} streams reached a pod \
                 within 10 s (the rest wait in the router)",
                downloads()
            ));
        }
        let limit = bound(total);
        let peak = settle(&s.agent, &s.t, base, limit, Duration::from_secs(15));
        let held_now = router_held(&s.t);
        if held_now > held_bound(total) {
            failures.push(format!(
                "{total} connections that never read: the router holds {:.1} MiB by its own \
                 count, over min({total} x {:.0} MiB, {:.0} MiB) + {total} x {STREAMS_PER_CONNECTION} \
                 x 16 KiB = {:.1} MiB",
                mib(held_now),
                mib(CLIENT_BUFFER),
                mib(ROUTER_BUFFER_LIMIT),
                mib(held_bound(total))
            ));
        }
        let sent = pods_tx(&s.t) - tx0;
        eprintln!(
            "{total} connections that never read: agent RSS +{:.1} MiB (bound {:.1} MiB), \
             router holds {:.1} MiB (bound {:.1} MiB), pods sent {:.1} MiB, {} streams reached pods",
            mib(peak),
            mib(limit),
            mib(held_now),
            mib(held_bound(total)),
            mib(sent),
            downloads()
        );
        if peak > limit {
            failures.push(format!(
                "{total} connections that never read grew the agent's RSS by {:.1} MiB; the \
                 bound is min({total} x {:.0} MiB, {:.0} MiB) + {total} x {STREAMS_PER_CONNECTION} \
                 x 16 KiB + {total} x {} KiB + {:.0} MiB = {:.1} MiB",
                mib(peak),
                mib(CLIENT_BUFFER),
                mib(ROUTER_BUFFER_LIMIT),
                PER_CONNECTION >> 10,
                mib(FIXED),
                mib(limit)
            ));
            break;
        }
        // And the responses did flow: at least 8 KiB per new stream.
        if sent < n * STREAMS_PER_CONNECTION * (8 << 10) {
            failures.push(format!(
                "pods sent only {:.1} MiB to {n} new connections",
                mib(sent)
            ));
        }
    }
    // Meanwhile a normal client is served: small RPCs and 1 MiB downloads.
    let unary = h2_client_spawn(
        ns,
        cg,
        VIP,
        &[
            "--path",
            "/unary",
            "--requests",
            "200",
            "--concurrency",
            "8",
        ],
    )
    .expect("client");
    let download = h2_client_spawn(
        ns,
        cg,
        VIP,
        &[
            "--path",
            "/download?bytes=1048576",
            "--requests",
            "2",
            "--concurrency",
            "2",
        ],
    )
    .expect("client");
    match h2_client_wait_timeout(unary, Duration::from_secs(15)) {
        Ok(v) if v["statuses"]["0"] == 200 => {}
        Ok(v) => failures.push(format!("unary RPCs beside the {total}: {v}")),
        Err(e) => failures.push(format!("unary RPCs beside the {total}: {e:#}")),
    }
    match h2_client_wait_timeout(download, Duration::from_secs(15)) {
        Ok(v) if v["bytes_received"] == 2 << 20 && v["statuses"]["0"] == 2 => {}
        Ok(v) => failures.push(format!("1 MiB downloads beside the {total}: {v}")),
        Err(e) => failures.push(format!("1 MiB downloads beside the {total}: {e:#}")),
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        log_tail(&s.agent)
    );
    for h in held {
        h.close().expect("close");
    }
}

/// A GET request on stream 1 with END_STREAM, after the preface and an
/// empty SETTINGS, as hex for `lbt-h2 raw`.
fn raw_request(path: &str) -> String {
    let mut b = w::PREFACE.to_vec();
    w::settings(&mut b, &[]);
    let block = w::request("POST", path, "svc", &[]);
    w::headers(
        &mut b,
        1,
        w::flag::END_STREAM | w::flag::END_HEADERS,
        &block,
    );
    w::hex(&b)
}

#[test]
fn stream_idle_timeout_resets_a_stream_a_backend_never_answers() {
    let s = setup_with("h2idle", 2, &["--stream-idle-timeout", "2s"]);
    let (ns, cg) = (&s.t.client.name, Some(s.t.cgroup.path.as_path()));
    // Streams that keep exchanging frames for 5 s, longer than the
    // timeout, in each direction: not cut.
    let down = h2_client_spawn(
        ns,
        cg,
        VIP,
        &[
            "--path",
            "/drip?chunks=10&ms=500",
            "--requests",
            "2",
            "--concurrency",
            "2",
        ],
    )
    .expect("client");
    let up = h2_client_spawn(
        ns,
        cg,
        VIP,
        &[
            "--path",
            "/upload",
            "--requests",
            "2",
            "--concurrency",
            "2",
            "--upload-chunks",
            "10",
            "--upload-interval-ms",
            "500",
        ],
    )
    .expect("client");
    // On one connection, a stream nobody answers beside one that drips:
    // the timeout is per stream, not per connection.
    let mixed = h2_client_spawn(
        ns,
        cg,
        VIP,
        &[
            "--paths",
            "/slow?ms=60000,/drip?chunks=10&ms=500",
            "--requests",
            "2",
            "--concurrency",
            "2",
        ],
    )
    .expect("client");
    // A request the backend sits on for a minute: after 2 s with no frame
    // either way, RST_STREAM CANCEL to the client.
    let v = h2_raw(ns, cg, VIP, &raw_request("/slow?ms=60000"), 7).expect("raw");
    let frames = v["frames"].as_array().expect("frames");
    assert!(
        !frames.iter().any(|f| f["type"] == 1 && f["stream"] == 1),
        "the backend never answers, yet a response came: {v}"
    );
    let rst = frames
        .iter()
        .find(|f| f["type"] == 3 && f["stream"] == 1)
        .unwrap_or_else(|| panic!("no RST_STREAM on the idle stream within 7 s: {v}"));
    let code = u32::from_str_radix(rst["payload"].as_str().expect("payload"), 16).expect("code");
    assert_eq!(code, CANCEL, "RST_STREAM code: {rst}");
    let at = rst["at_s"].as_f64().expect("at_s");
    assert!(
        (1.5..=4.5).contains(&at),
        "reset after {at} s, want about 2 s: {v}"
    );
    let v = h2_client_wait_timeout(mixed, Duration::from_secs(20)).expect("mixed");
    let errors: u64 = v["errors"]
        .as_object()
        .map_or(0, |e| e.values().filter_map(Value::as_u64).sum());
    assert_eq!(errors, 1, "only the idle stream is reset: {v}");
    let ms = v["error_latency_ms"][0].as_u64().expect("latency");
    assert!(
        (1500..=4500).contains(&ms),
        "idle stream reset after {ms} ms: {v}"
    );
    assert_eq!(v["statuses"]["0"], 1, "the dripping stream completed: {v}");
    assert_eq!(v["bytes_received"], 10 * 1024, "{v}");
    // ... and the backend hop of both idle streams was reset too.
    Topology::wait_for(
        "the backend to see the resets",
        Duration::from_secs(3),
        || {
            Ok(s.t
                .pods
                .iter()
                .map(|p| p.h2.as_ref().expect("h2").count("reset /slow"))
                .sum::<usize>()
                == 2)
        },
    )
    .expect("backend resets");
    for (what, child) in [("download", down), ("upload", up)] {
        let v = h2_client_wait_timeout(child, Duration::from_secs(20)).expect(what);
        no_errors(&v);
        assert_eq!(v["statuses"]["0"], 2, "{what}: {v}");
        assert!(v["elapsed_s"].as_f64() >= Some(4.5), "{what} took 5 s: {v}");
        if what == "download" {
            assert_eq!(v["bytes_received"], 2 * 10 * 1024, "{v}");
        } else {
            assert_eq!(v["echo_ok"], true, "the server got every chunk: {v}");
        }
    }
}

/// The router's connect timeout for backends (the agent's `router/`).
const CONNECT_TIMEOUT_S: f64 = 3.0;

#[test]
fn backend_that_never_sends_settings_is_given_up_and_streams_retried() {
    require_root();
    let mut t = Topology::new("h2silent", 4, &[]).expect("topology");
    for p in &mut t.pods[..3] {
        p.h2 = Some(H2Server::start(&p.ns.name, &p.name, H2_PORT).expect("h2 server"));
    }
    // pod3 accepts TCP on the service's port and never sends a byte.
    let silent = H2Server::start_silent(&t.pods[3].ns.name, H2_PORT).expect("silent");
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &http2_yaml(&t, &[0, 1, 2, 3]),
        Some(&t.node.name),
        &["--proxy-addr", ROUTER_ADDR],
    )
    .expect("agent");
    for round in 1..=2 {
        let child = h2_client_spawn(
            &t.client.name,
            Some(&t.cgroup.path),
            VIP,
            &[
                "--path",
                "/unary",
                "--requests",
                "200",
                "--concurrency",
                "16",
            ],
        )
        .expect("client");
        let v = h2_client_wait_timeout(child, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", agent.log()));
        no_errors(&v);
        assert_eq!(pods_of(&v).iter().map(|(_, n)| n).sum::<u64>(), 200, "{v}");
        let elapsed = v["elapsed_s"].as_f64().expect("elapsed");
        assert!(
            elapsed < CONNECT_TIMEOUT_S + 3.0,
            "round {round}: 200 RPCs took {elapsed:.1} s; the silent backend must be given up \
             within the {CONNECT_TIMEOUT_S} s connect timeout and its streams retried: {v}"
        );
    }
    assert!(
        silent.count_prefix("conn ") >= 1,
        "the router never tried the silent endpoint, so this proved nothing"
    );
}

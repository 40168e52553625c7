//! The HTTP/2 router's core on arbitrary bytes from a client and from its
//! backends, fed in arbitrary chunks.
//!
//! Properties: it never panics (the agent must not, on input from the
//! network), and how the byte streams are split into reads never changes
//! what the router sends to anyone (it sees TCP reads of any size).
#![no_main]

use std::sync::Arc;

use balancer_router::{
    core::{ConnId, Core, Io},
    endpoint::{Algorithm, Endpoint, Pool},
    frame::PREFACE,
};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fn connect_all(core: &mut Core, backends: &mut Vec<ConnId>) {
    for io in core.take_io() {
        if let Io::Connect { id, .. } = io {
            backends.push(id);
            core.backend_connected(id);
        }
    }
}

/// Everything the router wrote, per connection, in the order of ids.
fn run(client: &[u8], backend: &[u8], step: usize) -> Vec<(ConnId, Vec<u8>)> {
    let eps: Vec<Arc<Endpoint>> = (0..2)
        .map(|i| {
            Arc::new(Endpoint::new(
                format!("198.18.1.{}:80", 10 + i).parse().expect("addr"),
            ))
        })
        .collect();
    let pool = Pool::new(Algorithm::RoundRobin, eps);
    let mut core = Core::new(Box::new(move |_, tried| pool.pick(tried)));
    let c = core.add_client("198.19.0.1:80".parse().expect("vip"));
    let mut backends = Vec::new();
    let mut buf = BytesMut::new();
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(client);
    for chunk in input.chunks(step) {
        buf.extend_from_slice(chunk);
        core.client_read(c, &mut buf);
        connect_all(&mut core, &mut backends);
    }
    // Each backend connection sends the same bytes back.
    let first: Vec<ConnId> = backends.clone();
    for b in first {
        let mut buf = BytesMut::new();
        for chunk in backend.chunks(step) {
            buf.extend_from_slice(chunk);
            core.backend_read(b, &mut buf);
            connect_all(&mut core, &mut backends);
        }
    }
    let mut out = Vec::new();
    for id in std::iter::once(c).chain(backends) {
        let mut buf = BytesMut::new();
        if core.take_out(id, &mut buf).is_some() {
            out.push((id, buf.to_vec()));
        }
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    // The first part is the client's, the rest the backends'.
    let cut = data.len() * usize::from(seed & 0x0f) / 16;
    let (client, backend) = data.split_at(cut);
    let whole = run(client, backend, usize::MAX);
    let step = usize::from(seed >> 4).max(1);
    assert_eq!(run(client, backend, step), whole);
});

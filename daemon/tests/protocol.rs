//! Hostile and malformed input: each bad connection gets its error, nobody else is disturbed.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{data_dir, Daemon, DaemonOpts};
use flatbuffers::FlatBufferBuilder;
use proto::client::{Client, ReadParams};
use proto::frame::encode_frame;
use proto::wire::{self, AckLevel, ErrorCode, RequestBodyT, ResponseBodyT};
use proto::ClientError;

/// Reads the socket until the server closes it; returns everything received.
fn read_to_close(c: &mut Client) -> Vec<u8> {
    let mut all = Vec::new();
    let sock = c.socket();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn single_error(bytes: &[u8]) -> (u64, ErrorCode) {
    let payload = proto::frame::decode_whole_frame(bytes, 1 << 20).expect("exactly one frame");
    let resp = proto::codec::decode_response(payload).unwrap();
    let ResponseBodyT::Error(e) = resp.body else {
        panic!("expected an Error, got {:?}", resp.body)
    };
    (resp.id, e.code)
}

fn healthy(d: &Daemon) {
    let mut other = d.client();
    other.ping().unwrap();
    other.append(1, b"still serving", AckLevel::Durable).unwrap().unwrap();
}

#[test]
fn zero_length_prefix_gets_an_error_and_only_that_connection_closes() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(1));
    let mut bystander = d.client();
    let mut bad = d.client();
    bad.send_raw(&0u32.to_le_bytes()).unwrap();
    let (id, code) = single_error(&read_to_close(&mut bad));
    assert_eq!((id, code), (0, ErrorCode::FrameTooLarge));
    bystander.ping().unwrap();
    healthy(&d);
    let stats = bystander.stats().unwrap();
    assert_eq!(stats.front.unwrap().protocol_errors, 1);
}

#[test]
fn oversized_length_prefix_is_refused_before_reading_the_payload() {
    let dir = data_dir();
    let opts = DaemonOpts::shards(1).arg("--max-frame-bytes").arg("65536");
    let d = Daemon::start(dir.path(), &opts);
    let mut bad = d.client();
    let mut bytes = (65537u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&[7u8; 1000]);
    bad.send_raw(&bytes).unwrap();
    let (id, code) = single_error(&read_to_close(&mut bad));
    assert_eq!((id, code), (0, ErrorCode::FrameTooLarge));
    // A frame at the limit is fine.
    let mut ok = d.client();
    let payload = vec![1u8; 60_000];
    ok.append(3, &payload, AckLevel::Durable).unwrap().unwrap();
    healthy(&d);
}

#[test]
fn garbage_payload_is_answered_and_the_connection_goes_on() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(2));
    let mut c = d.client();
    let mut frame = Vec::new();
    encode_frame(&[0xff; 64], &mut frame);
    c.send_raw(&frame).unwrap();
    match c.read_response() {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::BadRequest),
        other => panic!("expected BadRequest, got {other:?}"),
    }
    c.ping().unwrap();
    c.append(5, b"after garbage", AckLevel::Durable).unwrap().unwrap();
}

#[test]
fn unknown_message_tag_is_answered_with_its_id() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(1));
    let mut c = d.client();
    // A Request whose union names a message type this server does not know.
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::Ping::create(&mut fbb, &wire::PingArgs {});
    let root = wire::Request::create(
        &mut fbb,
        &wire::RequestArgs {
            id: 4242,
            body_type: wire::RequestBody(200),
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(root, None);
    let mut frame = Vec::new();
    encode_frame(fbb.finished_data(), &mut frame);
    c.send_raw(&frame).unwrap();
    let resp = c.wait(4242).unwrap();
    let ResponseBodyT::Error(e) = resp.body else {
        panic!("{:?}", resp.body)
    };
    assert_eq!(e.code, ErrorCode::UnknownMessage);
    c.ping().unwrap();
}

#[test]
fn bad_requests_get_precise_errors() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(2));
    let mut c = d.client();
    let err = c.read(ReadParams::new(9, 1)).unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchShard));

    let id = c
        .send(RequestBodyT::Hello(Box::new(wire::HelloT {
            version: 99,
            client_name: None,
            auth_token: None,
        })))
        .unwrap();
    let resp = c.wait(id).unwrap();
    let ResponseBodyT::Error(e) = resp.body else {
        panic!("{:?}", resp.body)
    };
    assert_eq!(e.code, ErrorCode::UnsupportedVersion);

    // An append over the shard's per-append limit is refused, and the connection goes on.
    let big = vec![0u8; 3 << 20];
    let err = c.append(1, &big, AckLevel::Durable).unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::TooLarge), "{err}");
    c.ping().unwrap();
}

#[test]
fn connections_over_the_limit_are_refused_with_an_error() {
    let dir = data_dir();
    let d = Daemon::start(dir.path(), &DaemonOpts::shards(1).arg("--max-connections").arg("2"));
    let mut a = d.client();
    let _b = d.client();
    let mut over = Client::connect_raw(d.addr).unwrap();
    let (id, code) = single_error(&read_to_close(&mut over));
    assert_eq!((id, code), (0, ErrorCode::TooManyConnections));
    a.ping().unwrap();
    drop(a);
    // The freed slot is reused once the server has noticed the close.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut c = Client::connect_raw(d.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        match c.hello("retry") {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.server_code(), Some(ErrorCode::TooManyConnections), "{e}");
                assert!(attempts < 1000, "slot never freed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

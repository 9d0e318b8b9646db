//! Prints the frames of a short example session as hex dumps, as shown in
//! docs/PROTOCOL.md: `cargo run -p proto --example session_hexdump`.

use proto::codec::{AppendRecord, Encoder};
use proto::wire::*;

fn dump(title: &str, bytes: &[u8]) {
    println!("{title} ({} bytes)", bytes.len());
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!("  {:04x}  {:<47}  {}", i * 16, hex.join(" "), ascii);
    }
    println!();
}

fn main() {
    let mut enc = Encoder::new();
    let mut out = Vec::new();

    let hello = RequestT {
        id: 1,
        body: RequestBodyT::Hello(Box::new(HelloT {
            version: 1,
            client_name: Some("demo".into()),
            auth_token: None,
        })),
    };
    enc.request(&hello, &mut out);
    dump(
        "client -> server: Request{id=1, Hello{version=1, client_name=\"demo\"}}",
        &out,
    );

    out.clear();
    let ok = ResponseT {
        id: 1,
        body: ResponseBodyT::HelloOk(Box::new(HelloOkT {
            version: 1,
            server: Some("shardlogd".into()),
            shard_count: 1,
            shard_addresses: None,
        })),
    };
    enc.response(&ok, &mut out);
    dump(
        "server -> client: Response{id=1, HelloOk{version=1, server=\"shardlogd\", shard_count=1}}",
        &out,
    );

    out.clear();
    enc.append(2, 42, [AppendRecord::new(b"hi")], AckLevel::Durable, &mut out);
    dump(
        "client -> server: Request{id=2, Append{stream=42, records=[\"hi\"], ack=Durable}}",
        &out,
    );

    out.clear();
    enc.appended(2, 0, 1, 1, &mut out);
    dump(
        "server -> client: Response{id=2, Appended{shard=0, first_lsn=1, count=1}}",
        &out,
    );
}

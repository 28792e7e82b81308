//! The broker's security rules with real MQTT clients (rumqttc over rustls), on the embedded
//! broker and, when `DRIFTGATE_TEST_MOSQUITTO=1`, on Mosquitto configured from the template:
//! device A's certificate can neither subscribe to nor publish on device B's topics; a
//! connection without a certificate (or with one from another CA) is refused; a revoked
//! device is refused. The embedded broker also gets its MQTT features checked: retained
//! messages, last will, persistent sessions, 4 MiB payloads, dropping a device on demand.

use std::collections::{HashSet, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_protocol::{DeviceId, TopicKind, Topics};
use fleet_server::broker::{
    mosquitto_acl, mosquitto_password_line, render_mosquitto_config, BrokerTls, ConnectGate,
    EmbeddedBroker, EmbeddedBrokerConfig, MosquittoVars, MIN_PACKET_BYTES,
};
use fleet_server::ca::{DeviceCa, IssuedCert};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Packet, Publish, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

const SERVER_USER: &str = "fleet-server";
const SERVER_PASSWORD: &str = "s3cret-for-tests";
/// How long a message that must not arrive is waited for, after a later one did arrive.
const QUIET: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// PKI and gate

/// A device CA in a temp dir, the broker's certificate, and device certificates on demand.
struct Pki {
    dir: tempfile::TempDir,
    ca: DeviceCa,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = DeviceCa::load_or_create(&dir.path().join("ca")).unwrap();
        assert!(created);
        let server = ca
            .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()], 30)
            .unwrap();
        let server_cert = dir.path().join("broker.pem");
        let server_key = dir.path().join("broker.key");
        std::fs::write(&server_cert, &server.cert_pem).unwrap();
        std::fs::write(&server_key, &server.key_pem).unwrap();
        Pki {
            dir,
            ca,
            server_cert,
            server_key,
        }
    }

    fn device(&self, id: &str) -> IssuedCert {
        self.ca
            .issue_device(&DeviceId::new(id).unwrap(), 30)
            .unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Allows exactly the devices it was told about.
#[derive(Default)]
struct Gate(Mutex<HashSet<String>>);

impl Gate {
    fn allow(&self, id: &str) {
        self.0.lock().unwrap().insert(id.to_string());
    }
    fn revoke(&self, id: &str) {
        self.0.lock().unwrap().remove(id);
    }
}

impl ConnectGate for Gate {
    fn allows(&self, device: &DeviceId) -> bool {
        self.0.lock().unwrap().contains(device.as_str())
    }
}

// ---------------------------------------------------------------------------------------
// MQTT clients

/// A connected client whose event loop runs in a task, its packets queued for the test.
struct Conn {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<Packet, String>>,
    publishes: VecDeque<Publish>,
    task: tokio::task::JoinHandle<()>,
    down: Option<String>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(client_id: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(8 << 20, 8 << 20);
    options
}

/// Options for a device: TLS with the given CA and, optionally, a client certificate.
fn device_options(
    client_id: &str,
    port: u16,
    ca_pem: &str,
    cert: Option<&IssuedCert>,
) -> MqttOptions {
    let mut options = options(client_id, port);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: ca_pem.as_bytes().to_vec(),
        alpn: None,
        client_auth: cert.map(|c| {
            (
                c.cert_pem.clone().into_bytes(),
                c.key_pem.clone().into_bytes(),
            )
        }),
    }));
    options
}

/// Connects and waits for the CONNACK; Err carries the reason the connection failed.
async fn connect(options: MqttOptions) -> Result<Conn, String> {
    let (client, eventloop) = AsyncClient::new(options, 64);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(drive(eventloop, tx));
    match tokio::time::timeout(TIMEOUT, rx.recv()).await {
        Ok(Some(Ok(Packet::ConnAck(_)))) => Ok(Conn {
            client,
            rx,
            publishes: VecDeque::new(),
            task,
            down: None,
        }),
        Ok(Some(Ok(other))) => Err(format!("expected CONNACK, got {other:?}")),
        Ok(Some(Err(e))) => Err(e),
        Ok(None) => Err("event loop ended".into()),
        Err(_) => Err("no CONNACK in time".into()),
    }
}

/// Polls until the first error (no reconnects: a test wants to see the connection end).
async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Result<Packet, String>>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(packet)) => {
                if tx.send(Ok(packet)).is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(_)) => {}
            Err(e) => {
                let reason = match &e {
                    ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
                    other => other.to_string(),
                };
                let _ = tx.send(Err(reason));
                return;
            }
        }
    }
}

fn is_not_authorized(result: &Result<Conn, String>) -> bool {
    matches!(result, Err(e) if e.contains(&format!("{:?}", ConnectReturnCode::NotAuthorized))
        || e.contains(&format!("{:?}", ConnectReturnCode::BadUserNamePassword)))
}

impl Conn {
    /// The next packet that is not a PUBLISH (those are kept for `next_publish`).
    async fn next_control(&mut self, within: Duration) -> Option<Packet> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Ok(Packet::Publish(p)))) => self.publishes.push_back(p),
                Ok(Some(Ok(packet))) => return Some(packet),
                Ok(Some(Err(e))) => {
                    self.down = Some(e);
                    return None;
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next_control(TIMEOUT).await {
                Some(Packet::SubAck(ack)) => return ack.return_codes[0],
                Some(_) => continue,
                None => panic!("no SUBACK for {filter}: {:?}", self.down),
            }
        }
    }

    async fn publish(&self, topic: &str, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await
            .unwrap();
    }

    async fn next_publish(&mut self, within: Duration) -> Option<Publish> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.publishes.pop_front() {
                return Some(p);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Ok(Packet::Publish(p)))) => return Some(p),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => {
                    self.down = Some(e);
                    return None;
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next message on `topic`, skipping others; panics after the timeout.
    async fn expect(&mut self, topic: &str) -> Publish {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_publish(left).await {
                Some(p) if p.topic == topic => return p,
                Some(_) => continue,
                None => panic!("nothing on {topic} (connection: {:?})", self.down),
            }
        }
    }

    /// Every message received in the next `within`.
    async fn drain(&mut self, within: Duration) -> Vec<Publish> {
        let mut got = Vec::new();
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next_publish(left).await {
                Some(p) => got.push(p),
                None => break,
            }
        }
        got
    }

    /// Waits until the connection ends; true if it did within `within`.
    async fn wait_down(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.down.is_none() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Ok(Packet::Publish(p)))) => self.publishes.push_back(p),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => self.down = Some(e),
                Ok(None) => self.down = Some("event loop ended".into()),
                Err(_) => return false,
            }
        }
        true
    }
}

// ---------------------------------------------------------------------------------------
// The brokers under test

/// Where a broker under test listens, and what its clients need.
struct Target {
    name: &'static str,
    device_port: u16,
    internal_port: u16,
    ca_pem: String,
}

impl Target {
    async fn server(&self, client_id: &str) -> Conn {
        let mut options = options(client_id, self.internal_port);
        options.set_credentials(SERVER_USER, SERVER_PASSWORD);
        connect(options)
            .await
            .unwrap_or_else(|e| panic!("{}: the server cannot log in: {e}", self.name))
    }

    fn device_options(&self, id: &str, cert: Option<&IssuedCert>) -> MqttOptions {
        device_options(id, self.device_port, &self.ca_pem, cert)
    }

    async fn device(&self, id: &str, cert: &IssuedCert) -> Conn {
        connect(self.device_options(id, Some(cert)))
            .await
            .unwrap_or_else(|e| panic!("{}: device {id} cannot connect: {e}", self.name))
    }
}

fn topic(device: &str, kind: TopicKind) -> String {
    Topics::default().topic(&DeviceId::new(device).unwrap(), kind)
}

fn config(pki: &Pki, listen: SocketAddr, internal_listen: SocketAddr) -> EmbeddedBrokerConfig {
    EmbeddedBrokerConfig {
        listen,
        internal_listen,
        tls: BrokerTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: pki.ca.cert_path(),
        },
        topics: Topics::default(),
        max_packet_bytes: MIN_PACKET_BYTES,
        server_username: SERVER_USER.into(),
        server_password: SERVER_PASSWORD.into(),
    }
}

async fn start_embedded(pki: &Pki, gate: Arc<Gate>) -> (EmbeddedBroker, Target) {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let broker = EmbeddedBroker::start(config(pki, any, any), gate)
        .await
        .unwrap();
    let target = Target {
        name: "embedded",
        device_port: broker.device_addr().port(),
        internal_port: broker.internal_addr().port(),
        ca_pem: pki.ca.cert_pem().to_string(),
    };
    (broker, target)
}

/// The checks every broker must pass with devices "a" and "b" enrolled.
async fn cross_device_checks(target: &Target, pki: &Pki, a_cert: &IssuedCert, b_cert: &IssuedCert) {
    let name = target.name;
    let mut server = target.server(&format!("server-{name}")).await;
    for kind in [TopicKind::Up, TopicKind::State] {
        let filter = Topics::default().all_devices(kind);
        assert!(matches!(
            server.subscribe(&filter).await,
            SubscribeReasonCode::Success(_)
        ));
    }
    let mut a = target.device("a", a_cert).await;
    let mut b = target.device("b", b_cert).await;

    // A's wildcard and cross-device subscriptions: refused in the SUBACK, or at least never
    // delivering anything of B's.
    let mut codes = Vec::new();
    for filter in [
        topic("b", TopicKind::Directive),
        "driftgate/d/+/directive".to_string(),
        "driftgate/d/+/up".to_string(),
        "#".to_string(),
    ] {
        codes.push((filter.clone(), a.subscribe(&filter).await));
    }
    let own = topic("a", TopicKind::Directive);
    assert!(
        matches!(a.subscribe(&own).await, SubscribeReasonCode::Success(_)),
        "{name}: A may subscribe to its own directive"
    );
    assert!(matches!(
        b.subscribe(&topic("b", TopicKind::Directive)).await,
        SubscribeReasonCode::Success(_)
    ));
    println!("{name}: SUBACKs of A's foreign subscriptions: {codes:?}");
    if name == "embedded" {
        for (filter, code) in &codes {
            assert_eq!(*code, SubscribeReasonCode::Failure, "{name}: {filter}");
        }
    }

    // The server publishes B's directive, then A's; B publishes its uplink. A must see only
    // its own directive; B its own.
    server
        .publish(&topic("b", TopicKind::Directive), false, "for b")
        .await;
    b.publish(&topic("b", TopicKind::Up), false, "b's batch")
        .await;
    server.publish(&own, false, "for a").await;
    let got = a.expect(&own).await;
    assert_eq!(&got.payload[..], b"for a");
    let extra = a.drain(QUIET).await;
    assert!(
        extra.is_empty(),
        "{name}: A received other devices' messages: {:?}",
        extra.iter().map(|p| &p.topic).collect::<Vec<_>>()
    );
    let got = b.expect(&topic("b", TopicKind::Directive)).await;
    assert_eq!(&got.payload[..], b"for b");
    let got = server.expect(&topic("b", TopicKind::Up)).await;
    assert_eq!(&got.payload[..], b"b's batch");

    // A publishing as B never reaches the server; A's own uplink, sent after it, does.
    a.publish(&topic("b", TopicKind::Up), false, "forged").await;
    a.publish(&topic("b", TopicKind::State), true, "forged")
        .await;
    a.publish(&topic("a", TopicKind::Up), false, "a's batch")
        .await;
    let got = server.expect(&topic("a", TopicKind::Up)).await;
    assert_eq!(&got.payload[..], b"a's batch");
    let extra = server.drain(QUIET).await;
    assert!(
        extra.iter().all(|p| !p.topic.contains("/d/b/")),
        "{name}: a forged message reached the server: {extra:?}"
    );
    // Nor was anything retained for B: a late subscriber sees no forged state.
    let mut late = target.server(&format!("late-{name}")).await;
    late.subscribe(&topic("b", TopicKind::State)).await;
    assert!(
        late.drain(QUIET).await.is_empty(),
        "{name}: a forged state was retained"
    );

    // No certificate, or one from another CA: refused.
    let refused = connect(target.device_options("a", None)).await;
    assert!(
        refused.is_err(),
        "{name}: a connection without a certificate was accepted"
    );
    let other = DeviceCa::load_or_create(&pki.path("other-ca")).unwrap().0;
    let foreign = other
        .issue_device(&DeviceId::new("a").unwrap(), 30)
        .unwrap();
    let refused = connect(target.device_options("a", Some(&foreign))).await;
    assert!(
        refused.is_err(),
        "{name}: a certificate from another CA was accepted"
    );
    // A's legitimate connection is unaffected by all of this.
    server.publish(&own, false, "still there").await;
    assert_eq!(&a.expect(&own).await.payload[..], b"still there");
}

// ---------------------------------------------------------------------------------------
// The embedded broker

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_devices_cannot_reach_each_other() {
    let pki = Pki::new();
    let gate = Arc::new(Gate::default());
    gate.allow("a");
    gate.allow("b");
    let (broker, target) = start_embedded(&pki, gate.clone()).await;
    cross_device_checks(&target, &pki, &pki.device("a"), &pki.device("b")).await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_refuses_revoked_impostors_and_bad_logins() {
    let pki = Pki::new();
    let gate = Arc::new(Gate::default());
    gate.allow("a");
    let (broker, target) = start_embedded(&pki, gate.clone()).await;
    let a_cert = pki.device("a");

    // Unknown to the gate (never enrolled, or revoked): not authorized.
    let c_cert = pki.device("c");
    assert!(is_not_authorized(
        &connect(target.device_options("c", Some(&c_cert))).await
    ));
    // A's certificate with another client id (B's session): refused.
    let as_b = connect(target.device_options("b", Some(&a_cert))).await;
    assert!(is_not_authorized(&as_b), "{:?}", as_b.as_ref().err());
    // A last will on another device's topic would let A publish as B: refused at CONNECT.
    let mut options = target.device_options("a", Some(&a_cert));
    options.set_last_will(LastWill::new(
        topic("b", TopicKind::Status),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    assert!(is_not_authorized(&connect(options).await));
    // The device MQTT user name is ignored: a device claiming the server's credentials is
    // still just device "a".
    let mut options = target.device_options("a", Some(&a_cert));
    options.set_credentials(SERVER_USER, SERVER_PASSWORD);
    let mut a = connect(options).await.unwrap();
    assert_eq!(a.subscribe("#").await, SubscribeReasonCode::Failure);
    drop(a);

    // The internal listener: right password only, and it does not speak TLS to devices.
    let mut wrong = options_internal(&target, "server-wrong");
    wrong.set_credentials(SERVER_USER, "wrong");
    assert!(is_not_authorized(&connect(wrong).await));
    assert!(is_not_authorized(
        &connect(options_internal(&target, "anonymous")).await
    ));

    // Revoke A while connected: disconnect() drops it, and it cannot come back.
    let mut a = target.device("a", &a_cert).await;
    gate.revoke("a");
    broker.disconnect(&DeviceId::new("a").unwrap()).await;
    assert!(
        a.wait_down(TIMEOUT).await,
        "A stayed connected after disconnect()"
    );
    assert!(is_not_authorized(
        &connect(target.device_options("a", Some(&a_cert))).await
    ));
    broker.shutdown().await;
}

fn options_internal(target: &Target, client_id: &str) -> MqttOptions {
    options(client_id, target.internal_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_retains_wills_queues_and_carries_4_mib() {
    let pki = Pki::new();
    let gate = Arc::new(Gate::default());
    gate.allow("a");
    let (broker, target) = start_embedded(&pki, gate.clone()).await;
    let a_cert = pki.device("a");
    let mut server = target.server("server").await;

    // Retained: a directive published before the device subscribes is delivered to it.
    server
        .publish(
            &topic("a", TopicKind::Directive),
            true,
            "retained directive",
        )
        .await;
    // (A QoS 1 round trip on the server's own connection orders the publish before the
    // device's subscription.)
    server.subscribe(&topic("a", TopicKind::Status)).await;
    let mut a = target.device("a", &a_cert).await;
    a.subscribe(&topic("a", TopicKind::Directive)).await;
    let got = a.expect(&topic("a", TopicKind::Directive)).await;
    assert!(got.retain);
    assert_eq!(&got.payload[..], b"retained directive");
    drop(a);

    // Last will: the device's TCP connection dies without DISCONNECT.
    let mut options = target.device_options("a", Some(&a_cert));
    options.set_last_will(LastWill::new(
        topic("a", TopicKind::Status),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let a = connect(options).await.unwrap();
    a.publish(&topic("a", TopicKind::Status), true, "online")
        .await;
    assert_eq!(
        &server.expect(&topic("a", TopicKind::Status)).await.payload[..],
        b"online"
    );
    drop(a); // aborts the event loop: the socket closes, no DISCONNECT is sent
    let will = server.expect(&topic("a", TopicKind::Status)).await;
    assert_eq!(&will.payload[..], b"offline");

    // Persistent session: QoS 1 messages published while the device is away wait for it.
    let ack = topic("a", TopicKind::Ack);
    let mut options = target.device_options("a", Some(&a_cert));
    options.set_clean_session(false);
    let mut a = connect(options.clone()).await.unwrap();
    a.subscribe(&ack).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        server.publish(&ack, false, format!("ack {i}")).await;
    }
    server.subscribe(&topic("a", TopicKind::Fetch)).await; // round trip: the publishes are in
    let mut a = connect(options).await.unwrap();
    for i in 0..3 {
        let got = a.expect(&ack).await;
        assert_eq!(got.payload, format!("ack {i}").into_bytes());
    }

    // 4 MiB + 1 KiB both ways.
    let big: Vec<u8> = (0..4 * 1024 * 1024 + 1024)
        .map(|i| (i % 251) as u8)
        .collect();
    let chunk = topic("a", TopicKind::Chunk);
    a.subscribe(&chunk).await;
    let start = Instant::now();
    server.publish(&chunk, false, big.clone()).await;
    let got = a.expect(&chunk).await;
    let down = start.elapsed();
    assert!(got.payload[..] == big[..], "chunk payload differs");
    server.subscribe(&topic("a", TopicKind::Up)).await;
    let start = Instant::now();
    a.publish(&topic("a", TopicKind::Up), false, big.clone())
        .await;
    let got = server.expect(&topic("a", TopicKind::Up)).await;
    let up = start.elapsed();
    assert!(got.payload[..] == big[..], "uplink payload differs");
    let mib = big.len() as f64 / (1024.0 * 1024.0);
    println!(
        "4 MiB + 1 KiB through the embedded broker: server→device {:?} ({:.0} MiB/s), device→server {:?} ({:.0} MiB/s)",
        down,
        mib / down.as_secs_f64(),
        up,
        mib / up.as_secs_f64()
    );

    // A broker that is shut down drops its clients and closes its ports, and a new one can
    // bind the same ports at once (despite the closed connections' TIME_WAIT).
    let device_addr = SocketAddr::from(([127, 0, 0, 1], target.device_port));
    let internal_addr = SocketAddr::from(([127, 0, 0, 1], target.internal_port));
    broker.shutdown().await;
    assert!(
        a.wait_down(TIMEOUT).await,
        "a device stayed connected after shutdown"
    );
    assert!(
        server.wait_down(TIMEOUT).await,
        "the server stayed connected after shutdown"
    );
    assert!(
        std::net::TcpStream::connect(device_addr).is_err(),
        "the device port still accepts connections after shutdown"
    );
    let again = EmbeddedBroker::start(config(&pki, device_addr, internal_addr), gate)
        .await
        .expect("a new broker on the same ports");
    assert_eq!(again.device_addr(), device_addr);
    let target = Target {
        name: "embedded again",
        ..target
    };
    drop(target.device("a", &a_cert).await);
    again.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Mosquitto from the template

fn mosquitto_wanted(test: &str) -> bool {
    match std::env::var("DRIFTGATE_TEST_MOSQUITTO") {
        Ok(v) if !v.is_empty() && v != "0" => true,
        _ => {
            eprintln!(
                "skipped {test}: needs Mosquitto (set DRIFTGATE_TEST_MOSQUITTO=1 with mosquitto installed)"
            );
            false
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A Mosquitto process run from the rendered template; killed when dropped.
struct Mosquitto {
    child: std::process::Child,
    target: Target,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    fn spawn(conf: &Path) -> std::process::Child {
        let binary = std::env::var("MOSQUITTO").unwrap_or_else(|_| "mosquitto".into());
        // Its log goes next to the config: the refused handshakes the test provokes would
        // fill the test output with TLS errors.
        let log = std::fs::File::create(conf.with_extension("log")).unwrap();
        std::process::Command::new(&binary)
            .arg("-c")
            .arg(conf)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"))
    }

    async fn start(pki: &Pki) -> Mosquitto {
        // Mosquitto started as root drops to its own user before it reads the certificates:
        // the directories must be open to it (the CA key inside stays 0600).
        use std::os::unix::fs::PermissionsExt;
        for dir in [pki.dir.path().to_path_buf(), pki.path("ca")] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(pki.path("crl.pem"), pki.ca.crl_pem(&[], 1).unwrap()).unwrap();
        std::fs::write(pki.path("acl"), mosquitto_acl(&Topics::default())).unwrap();
        std::fs::write(
            pki.path("passwd"),
            mosquitto_password_line(SERVER_USER, SERVER_PASSWORD).unwrap() + "\n",
        )
        .unwrap();
        // A port from free_port() can be taken again before Mosquitto binds it (by another
        // test's client connections, say): try a few times with fresh ports.
        for attempt in 1..=5 {
            let vars = MosquittoVars {
                bind_address: "127.0.0.1".into(),
                port: free_port(),
                internal_port: free_port(),
                cafile: pki.ca.cert_path(),
                certfile: pki.server_cert.clone(),
                keyfile: pki.server_key.clone(),
                crlfile: pki.path("crl.pem"),
                aclfile: pki.path("acl"),
                server_password_file: pki.path("passwd"),
                topics: Topics::default(),
                max_packet_bytes: MIN_PACKET_BYTES,
                persistence_dir: None,
            };
            let conf = pki.path("mosquitto.conf");
            std::fs::write(&conf, render_mosquitto_config(&vars)).unwrap();
            let mut child = Self::spawn(&conf);
            if wait_for_ports(&mut child, &[vars.port, vars.internal_port]).await {
                // The template must open exactly its two listeners: a listener option
                // misplaced above them makes Mosquitto open a default one on 1883 as well.
                let mut opened = listening_ports(child.id());
                opened.sort_unstable();
                let mut ours = vec![vars.port, vars.internal_port];
                ours.sort_unstable();
                assert_eq!(opened, ours, "Mosquitto listens on other ports too");
                return Mosquitto {
                    child,
                    target: Target {
                        name: "mosquitto",
                        device_port: vars.port,
                        internal_port: vars.internal_port,
                        ca_pem: pki.ca.cert_pem().to_string(),
                    },
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(conf.with_extension("log")).unwrap_or_default();
            eprintln!("mosquitto did not start (attempt {attempt}):\n{log}");
        }
        panic!("mosquitto did not start; see the log above");
    }
}

/// The TCP ports process `pid` listens on (from `ss`).
fn listening_ports(pid: u32) -> Vec<u16> {
    let out = std::process::Command::new("ss")
        .args(["-ltnpH"])
        .output()
        .expect("ss (iproute2) to list listening sockets");
    let mine = format!("pid={pid},");
    let mut ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&mine))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit_once(':')?
                .1
                .parse()
                .ok()
        })
        .collect();
    ports.dedup();
    ports
}

/// Waits until the process listens on every port; false if it exits or takes too long.
async fn wait_for_ports(child: &mut std::process::Child, ports: &[u16]) -> bool {
    for _ in 0..250 {
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        let mut all = true;
        for port in ports {
            all &= tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_ok();
        }
        if all {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_devices_cannot_reach_each_other() {
    if !mosquitto_wanted("mosquitto_devices_cannot_reach_each_other") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = Pki::new();
    let mosquitto = Mosquitto::start(&pki).await;
    cross_device_checks(&mosquitto.target, &pki, &pki.device("a"), &pki.device("b")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_refuses_a_revoked_certificate() {
    if !mosquitto_wanted("mosquitto_refuses_a_revoked_certificate") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = Pki::new();
    let mosquitto = Mosquitto::start(&pki).await;
    let a_cert = pki.device("a");
    let b_cert = pki.device("b");
    let target = &mosquitto.target;
    drop(target.device("a", &a_cert).await);

    // Revoke A: the CRL is rewritten with A's serial and Mosquitto re-reads it on SIGHUP.
    let crl = pki
        .ca
        .crl_pem(&[(a_cert.serial_hex.clone(), 1_700_000_000)], 2)
        .unwrap();
    std::fs::write(pki.path("crl.pem"), crl).unwrap();
    let sighup = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(mosquitto.child.id().to_string())
        .status()
        .unwrap();
    assert!(sighup.success());
    // The reload is asynchronous: poll until A is refused.
    let deadline = Instant::now() + TIMEOUT;
    let refusal = loop {
        match connect(target.device_options("a", Some(&a_cert))).await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => panic!("a revoked certificate is still accepted after SIGHUP"),
        }
    };
    println!("mosquitto: revoked certificate after SIGHUP: {refusal}");
    // B, not revoked, still connects.
    drop(target.device("b", &b_cert).await);
}

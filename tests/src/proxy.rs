//! A TCP proxy between a device and its broker that a test controls: it can cut the link (reset,
//! or a silent black hole), and shape it (a rate limit shared by every connection through it,
//! and packet loss).
//!
//! It runs on a runtime of its own, in its own thread: cutting, restoring and shaping must work
//! the same whatever the test's own runtime is busy with.
//!
//! Loss is emulated, not made: the proxy sits above TCP, so it cannot drop a packet the kernel
//! would then retransmit. What a lost segment does to a TCP stream is hold it, and everything
//! behind it, until the sender retransmits; the proxy reproduces that. The stream is cut into
//! segments of one MSS (1,448 bytes); each is lost with the given probability, and a lost one
//! waits one retransmission timeout (200 ms, Linux's minimum RTO) before it and the rest of the
//! stream go on. Nothing is reordered or corrupted, as TCP would not let that through either.
//! (`tc netem` would lose real packets, but the kernels this runs on often lack it.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// One TCP segment on an Ethernet path with timestamps (1500 − 20 − 20 − 12).
pub const SEGMENT_BYTES: usize = 1448;

/// How long a lost segment holds the stream: Linux's minimum retransmission timeout.
pub const RETRANSMIT_AFTER: Duration = Duration::from_millis(200);

/// How the link dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The broker is gone: every connection is reset (RST) and new ones are reset at once.
    Reset,
    /// The path silently drops everything (a dead NAT entry, a cable pulled upstream): the
    /// connections stay open but nothing passes, and new connections are accepted and then
    /// hang. The device finds out only through its own timeouts.
    BlackHole,
}

/// The link's quality while it is up. The default is a clean, unlimited link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Shaping {
    /// Bytes per second in each direction, shared by every connection through the proxy (the
    /// capacity of the device's uplink, not of one socket). `None`: unlimited.
    pub bytes_per_sec: Option<u64>,
    /// The share of segments lost, 0.0 to 1.0, in each direction.
    pub loss: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Cut(Cut),
}

/// Which way bytes go through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Device → broker.
    Up,
    /// Broker → device.
    Down,
}

/// What the proxy has done, for the test to assert on.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    segments_lost: AtomicU64,
}

/// The rate limit: a clock of when the link is next free, per direction, shared by all
/// connections. A segment of `n` bytes occupies the link for `n / rate` seconds.
#[derive(Debug)]
struct Pacer {
    next_free: Mutex<[Option<Instant>; 2]>,
}

impl Pacer {
    /// How long to wait before `bytes` may go out in `direction` at `rate`.
    fn reserve(&self, direction: Direction, bytes: usize, rate: u64) -> Duration {
        let index = direction as usize;
        let now = Instant::now();
        let mut slots = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let start = slots[index].map_or(now, |free| free.max(now));
        let busy = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        slots[index] = Some(start + busy);
        (start + busy).saturating_duration_since(now)
    }
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    shaping: watch::Sender<Shaping>,
    counters: Arc<Counters>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (a loopback port).
    pub fn start(upstream: u16) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a proxy port");
        let port = listener.local_addr().expect("a bound socket").port();
        listener
            .set_nonblocking(true)
            .expect("a non-blocking socket");
        let (mode, modes) = watch::channel(Mode::Open);
        let (shaping, shapings) = watch::channel(Shaping::default());
        let counters = Arc::new(Counters::default());
        let pacer = Arc::new(Pacer {
            next_free: Mutex::new([None, None]),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = counters.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the proxy's runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("a tokio listener");
                    let accept = async {
                        let mut connection = 0u64;
                        loop {
                            let Ok((client, _)) = listener.accept().await else {
                                continue;
                            };
                            shared.accepted.fetch_add(1, Ordering::Relaxed);
                            if *modes.borrow() != Mode::Open {
                                shared.refused.fetch_add(1, Ordering::Relaxed);
                            }
                            connection += 1;
                            tokio::spawn(relay(
                                client,
                                upstream,
                                Link {
                                    modes: modes.clone(),
                                    shapings: shapings.clone(),
                                    pacer: pacer.clone(),
                                    counters: shared.clone(),
                                    // Each connection draws its own losses, the same ones on
                                    // every run for the same order of connections.
                                    seed: u64::from(port) << 32 | connection,
                                },
                            ));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every relay, closing its sockets.
            })
            .expect("the proxy thread starts");
        Proxy {
            port,
            mode,
            shaping,
            counters,
            _stop: stop,
        }
    }

    pub fn cut(&self, how: Cut) {
        self.mode.send_replace(Mode::Cut(how));
    }

    /// Lets connections through again. Connections held through a black hole are reset, as a
    /// path coming back with fresh state would do on their next packet.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }

    /// Changes the link's quality, for connections already open too.
    pub fn shape(&self, shaping: Shaping) {
        assert!(
            (0.0..1.0).contains(&shaping.loss),
            "loss is a share below 1.0"
        );
        self.shaping.send_replace(shaping);
    }

    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connection attempts that met a cut link.
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the broker to the device.
    pub fn bytes_down(&self) -> u64 {
        self.counters.bytes_down.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the device to the broker.
    pub fn bytes_up(&self) -> u64 {
        self.counters.bytes_up.load(Ordering::Relaxed)
    }

    /// Segments the emulated loss held back for a retransmission timeout.
    pub fn segments_lost(&self) -> u64 {
        self.counters.segments_lost.load(Ordering::Relaxed)
    }
}

/// What every relay of one proxy shares.
struct Link {
    modes: watch::Receiver<Mode>,
    shapings: watch::Receiver<Shaping>,
    pacer: Arc<Pacer>,
    counters: Arc<Counters>,
    seed: u64,
}

/// Closes with an RST rather than a FIN: what a peer sees when the other end is gone.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// How one direction of a relay ended.
enum End {
    /// A peer closed, or a write failed: the relay ends quietly (FIN).
    Closed,
    /// The link was cut: both sides get an RST.
    Cut,
}

async fn relay(client: TcpStream, upstream: u16, link: Link) {
    let mut modes = link.modes.clone();
    let mode = *modes.borrow_and_update();
    match mode {
        Mode::Open => {}
        Mode::Cut(Cut::Reset) => return reset(&client),
        Mode::Cut(Cut::BlackHole) => {
            // Accepted, never answered; reset once the path comes back.
            let _ = modes
                .wait_for(|mode| *mode != Mode::Cut(Cut::BlackHole))
                .await;
            return reset(&client);
        }
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return reset(&client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_in, mut client_out) = client.into_split();
    let (mut server_in, mut server_out) = server.into_split();
    let up = pump(
        &mut client_in,
        &mut server_out,
        Direction::Up,
        &link,
        link.seed,
    );
    let down = pump(
        &mut server_in,
        &mut client_out,
        Direction::Down,
        &link,
        link.seed ^ 0x5bd1_e995,
    );
    let end = tokio::select! {
        end = up => end,
        end = down => end,
    };
    if let End::Cut = end {
        reset(client_in.as_ref());
        reset(server_in.as_ref());
    }
}

/// Moves bytes one way until a peer closes or the link is cut, through the link's shaping.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    direction: Direction,
    link: &Link,
    seed: u64,
) -> End {
    let mut modes = link.modes.clone();
    let mut random = fastrand::Rng::with_seed(seed);
    let mut buffer = vec![0u8; 64 * 1024];
    // Set once the link has been black-holed: everything read is dropped from then on.
    let mut silent = false;
    loop {
        tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(n) if n > 0 => {
                    if silent {
                        continue;
                    }
                    for segment in buffer[..n].chunks(SEGMENT_BYTES) {
                        let shaping = *link.shapings.borrow();
                        if shaping.loss > 0.0 && random.f64() < shaping.loss {
                            link.counters.segments_lost.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(RETRANSMIT_AFTER).await;
                        }
                        if let Some(rate) = shaping.bytes_per_sec {
                            let wait = link.pacer.reserve(direction, segment.len(), rate);
                            tokio::time::sleep(wait).await;
                        }
                        if to.write_all(segment).await.is_err() {
                            return End::Closed;
                        }
                        let counter = match direction {
                            Direction::Up => &link.counters.bytes_up,
                            Direction::Down => &link.counters.bytes_down,
                        };
                        counter.fetch_add(segment.len() as u64, Ordering::Relaxed);
                    }
                }
                _ => return End::Closed,
            },
            changed = modes.changed() => {
                if changed.is_err() {
                    return End::Cut;
                }
                let mode = *modes.borrow_and_update();
                match mode {
                    Mode::Cut(Cut::Reset) => return End::Cut,
                    Mode::Cut(Cut::BlackHole) => silent = true,
                    // A connection that lived through a black hole has lost bytes both ways:
                    // it cannot be resumed, only ended.
                    Mode::Open if silent => return End::Cut,
                    Mode::Open => {}
                }
            }
        }
    }
}

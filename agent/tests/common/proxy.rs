//! A TCP proxy between an agent and its broker that the test can cut and restore, so the agent
//! loses the broker while the test's own clients (connected to the broker directly) keep it.
//!
//! It runs on a runtime of its own, in its own thread: cutting and restoring must work the same
//! whatever the test's runtime is busy with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the link dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The broker is gone: every connection is reset (RST) and new ones are reset at once.
    Reset,
    /// The path silently drops everything (a dead NAT entry, a cable pulled upstream): the
    /// connections stay open but nothing passes, and new connections are accepted and then
    /// hang. The agent finds out only through its own timeouts.
    BlackHole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Cut(Cut),
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    /// Connections accepted (and forwarded or not) since the start.
    accepted: Arc<AtomicU64>,
    /// Connections accepted while cut.
    refused: Arc<AtomicU64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (a loopback port).
    pub fn start(upstream: u16) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a proxy port");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (mode, modes) = watch::channel(Mode::Open);
        let accepted = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (accepted2, refused2) = (accepted.clone(), refused.clone());
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    let accept = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else {
                                continue;
                            };
                            accepted2.fetch_add(1, Ordering::Relaxed);
                            if *modes.borrow() != Mode::Open {
                                refused2.fetch_add(1, Ordering::Relaxed);
                            }
                            tokio::spawn(relay(client, upstream, modes.clone()));
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
            accepted,
            refused,
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

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connection attempts that met a cut link.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Closes with an RST rather than a FIN: what a peer sees when the other end is gone.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn relay(client: TcpStream, upstream: u16, mut modes: watch::Receiver<Mode>) {
    let mode = *modes.borrow_and_update();
    match mode {
        Mode::Open => {}
        Mode::Cut(Cut::Reset) => return reset(client),
        Mode::Cut(Cut::BlackHole) => {
            // Accepted, never answered; reset once the path comes back.
            let _ = modes
                .wait_for(|mode| *mode != Mode::Cut(Cut::BlackHole))
                .await;
            return reset(client);
        }
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_in, mut client_out) = client.into_split();
    let (mut server_in, mut server_out) = server.into_split();
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    // Set once the link has been black-holed: everything read is dropped from then on.
    let mut silent = false;
    // A peer that closed, or a write that failed, ends the relay quietly (FIN); a cut ends it
    // with an RST on both sides.
    let cut = loop {
        tokio::select! {
            read = client_in.read(&mut from_client) => match read {
                Ok(n) if n > 0 => {
                    if !silent && server_out.write_all(&from_client[..n]).await.is_err() {
                        break false;
                    }
                }
                _ => break false,
            },
            read = server_in.read(&mut from_server) => match read {
                Ok(n) if n > 0 => {
                    if !silent && client_out.write_all(&from_server[..n]).await.is_err() {
                        break false;
                    }
                }
                _ => break false,
            },
            changed = modes.changed() => {
                if changed.is_err() {
                    break true;
                }
                let mode = *modes.borrow_and_update();
                match mode {
                    Mode::Cut(Cut::Reset) => break true,
                    Mode::Cut(Cut::BlackHole) => silent = true,
                    // A connection that lived through a black hole has lost bytes both ways:
                    // it cannot be resumed, only ended.
                    Mode::Open if silent => break true,
                    Mode::Open => {}
                }
            }
        }
    };
    if cut {
        if let Ok(client) = client_in.reunite(client_out) {
            reset(client);
        }
        if let Ok(server) = server_in.reunite(server_out) {
            reset(server);
        }
    }
}

//! A TCP proxy in front of etcd that can swallow etcd's answers: requests
//! still reach etcd and are applied, but the client never hears back, so a
//! write ends with an unknown outcome although it landed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards 127.0.0.1:<port> to an etcd endpoint. While `drop_responses`
/// is set, bytes from etcd are read and discarded: requests still reach
/// etcd and are applied, but the client never hears back.
pub struct Proxy {
    addr: SocketAddr,
    drop_responses: Arc<AtomicBool>,
    /// Bytes of answers discarded so far.
    pub dropped_bytes: Arc<AtomicU64>,
    /// Bumping it closes every open connection.
    generation: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let drop_responses = Arc::new(AtomicBool::new(false));
        let dropped_bytes = Arc::new(AtomicU64::new(0));
        let (generation, _) = watch::channel(0u64);
        let accept = {
            let drop_responses = drop_responses.clone();
            let dropped_bytes = dropped_bytes.clone();
            let generation = generation.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue; // drops the client connection
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let mut cut = generation.subscribe();
                    let drop_responses = drop_responses.clone();
                    let dropped_bytes = dropped_bytes.clone();
                    tokio::spawn(async move {
                        let (mut client_rx, mut client_tx) = client.into_split();
                        let (mut server_rx, mut server_tx) = server.into_split();
                        let requests = tokio::io::copy(&mut client_rx, &mut server_tx);
                        let responses = async {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = server_rx.read(&mut buf).await?;
                                if n == 0 {
                                    return Ok::<_, std::io::Error>(());
                                }
                                if drop_responses.load(Ordering::SeqCst) {
                                    dropped_bytes.fetch_add(n as u64, Ordering::SeqCst);
                                } else {
                                    client_tx.write_all(&buf[..n]).await?;
                                }
                            }
                        };
                        // Whichever ends first closes both sockets.
                        tokio::select! {
                            _ = requests => {}
                            _ = responses => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            })
        };
        Proxy {
            addr,
            drop_responses,
            dropped_bytes,
            generation,
            accept,
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// A client of `namespace` through the proxy, with short timeouts so a
    /// swallowed answer ends in an unknown outcome within half a second.
    pub async fn client(&self, namespace: &str) -> pubsub_etcd::Client {
        pubsub_etcd::Client::builder([self.endpoint()])
            .namespace(namespace)
            .connect_timeout(Duration::from_secs(2))
            .request_timeout(Duration::from_millis(500))
            .connect()
            .await
            .unwrap()
    }

    /// From now on, discard etcd's answers.
    pub fn swallow_responses(&self) {
        self.drop_responses.store(true, Ordering::SeqCst);
    }

    /// Close every connection (the client reconnects) and forward answers
    /// again on the new ones.
    pub fn heal(&self) {
        self.generation.send_modify(|g| *g += 1);
        self.drop_responses.store(false, Ordering::SeqCst);
    }
}

impl Proxy {
    /// Stop listening and close every connection: etcd is gone.
    pub fn shut_down(&self) {
        self.accept.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

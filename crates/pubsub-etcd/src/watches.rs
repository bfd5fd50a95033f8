//! One etcd watch stream shared by all the partition readers of a consumer
//! or assigned reader.
//!
//! etcd multiplexes any number of watches on one gRPC stream, each with its
//! own id, key range and start revision. A stream per partition would cost
//! thousands of HTTP/2 streams and their buffers (about 15 KiB each) for
//! a consumer of thousands of partitions; here each watch costs a map entry
//! and a small channel. A watch behaves as one on its own stream: it starts
//! at the revision asked for, a compaction cancels it alone, and when the
//! shared stream breaks every watch on it ends, and each reader re-reads
//! and watches again (the hub opens a new stream on the next request).
//!
//! etcd answers creation requests on a stream in the order they were sent,
//! which is how a `created` response is matched to its request (etcd's own
//! Go client relies on the same order).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use etcd_client::{WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::Error;

/// Requests queued for the hub task; creations wait here while the hub is
/// delivering to a reader that is slow.
const REQUESTS: usize = 256;

/// Responses held for one watch ahead of its reader; the hub waits (and
/// with it every watch on the stream, which all feed the same consumer)
/// when a reader has this many unread.
const RESPONSES_PER_WATCH: usize = 2;

/// A handle on the hub task; the task ends once every handle (and every
/// watch made through one) is dropped, closing the stream and with it every
/// watch on it in etcd.
#[derive(Debug, Clone)]
pub(crate) struct WatchHub {
    requests: mpsc::Sender<Request>,
    tokens: Arc<AtomicU64>,
}

/// One watch on the shared stream. Dropping it cancels the watch in etcd.
#[derive(Debug)]
pub(crate) struct Watch {
    /// Boxed: a channel allocates slots 32 at a time, once per watch.
    responses: mpsc::Receiver<Box<WatchResponse>>,
    token: u64,
    requests: mpsc::Sender<Request>,
}

#[derive(Debug)]
enum Request {
    Create {
        token: u64,
        key: Vec<u8>,
        options: WatchOptions,
        responses: mpsc::Sender<Box<WatchResponse>>,
    },
    Cancel(u64),
}

impl WatchHub {
    /// Starts the hub task; it opens its stream on the first watch.
    pub(crate) fn new(client: Client) -> WatchHub {
        let (requests, receiver) = mpsc::channel(REQUESTS);
        tokio::spawn(
            Hub {
                client,
                requests: receiver,
                stream: None,
                pending: VecDeque::new(),
                routes: HashMap::new(),
                tokens_of: HashMap::new(),
            }
            .run(),
        );
        WatchHub {
            requests,
            tokens: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Watches `key` with `options` (range, start revision) on the shared
    /// stream. The responses after its creation come through
    /// [`Watch::next`]; a failure to create it, like a broken stream, ends
    /// it.
    pub(crate) async fn watch(&self, key: impl Into<Vec<u8>>, options: WatchOptions) -> Watch {
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        let (responses, receiver) = mpsc::channel(RESPONSES_PER_WATCH);
        // A send fails only once the hub has ended, and then the watch
        // reads as ended, which its reader handles like a broken stream.
        let _ = self
            .requests
            .send(Request::Create {
                token,
                key: key.into(),
                options,
                responses,
            })
            .await;
        Watch {
            responses: receiver,
            token,
            requests: self.requests.clone(),
        }
    }
}

impl Watch {
    /// The next response with events, or the one cancelling this watch
    /// (a compaction past its revision); `None` once it ended otherwise
    /// (the stream broke, or could not be opened), which the hub logged.
    pub(crate) async fn next(&mut self) -> Option<Box<WatchResponse>> {
        self.responses.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // A full queue drops the cancel: the hub then cancels the watch when
        // it next has a response for it and finds nobody listening.
        let _ = self.requests.try_send(Request::Cancel(self.token));
    }
}

/// A watch the hub delivers to, by its token.
struct Route {
    responses: mpsc::Sender<Box<WatchResponse>>,
    /// etcd's id for it, once etcd created it.
    id: Option<i64>,
}

struct Hub {
    client: Client,
    requests: mpsc::Receiver<Request>,
    stream: Option<(WatchRequestSender, WatchResponseStream)>,
    /// Tokens of creations sent and not yet answered, in the order sent.
    pending: VecDeque<u64>,
    routes: HashMap<u64, Route>,
    tokens_of: HashMap<i64, u64>,
}

impl Hub {
    async fn run(mut self) {
        loop {
            let response = match &mut self.stream {
                Some((_, responses)) => tokio::select! {
                    request = self.requests.recv() => match request {
                        Some(request) => {
                            self.handle(request).await;
                            continue;
                        }
                        None => return,
                    },
                    response = responses.message() => response,
                },
                None => match self.requests.recv().await {
                    Some(request) => {
                        self.handle(request).await;
                        continue;
                    }
                    None => return,
                },
            };
            match response {
                Ok(Some(response)) => self.route(response).await,
                Ok(None) => self.broken(Error::WatchEnded),
                Err(e) => self.broken(Error::etcd("watch partition", e)),
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Create {
                token,
                key,
                options,
                responses,
            } => {
                if responses.is_closed() {
                    return;
                }
                self.routes.insert(
                    token,
                    Route {
                        responses,
                        id: None,
                    },
                );
                self.pending.push_back(token);
                let sent = match &mut self.stream {
                    Some((sender, _)) => sender
                        .watch(key, Some(options))
                        .await
                        .map_err(|e| Error::etcd("watch partition", e)),
                    None => {
                        let opened = self
                            .client
                            .timed(
                                "watch partition",
                                self.client.watch.clone().watch(key, Some(options)),
                            )
                            .await;
                        opened.map(|stream| self.stream = Some(stream.split()))
                    }
                };
                if let Err(error) = sent {
                    self.broken(error);
                }
            }
            Request::Cancel(token) => {
                let Some(route) = self.routes.remove(&token) else {
                    return;
                };
                // A watch still being created is cancelled once etcd says
                // its id (`route` finds no route for it).
                if let Some(id) = route.id {
                    self.tokens_of.remove(&id);
                    self.cancel(id).await;
                }
            }
        }
    }

    async fn route(&mut self, response: WatchResponse) {
        let id = response.watch_id();
        if response.created() {
            let Some(token) = self.pending.pop_front() else {
                tracing::warn!(
                    watch_id = id,
                    "etcd created a watch nobody asked for; cancelling it"
                );
                self.cancel(id).await;
                return;
            };
            match self.routes.get_mut(&token) {
                Some(route) => {
                    route.id = Some(id);
                    self.tokens_of.insert(id, token);
                }
                None => {
                    self.cancel(id).await;
                    return;
                }
            }
        }
        let Some(&token) = self.tokens_of.get(&id) else {
            return;
        };
        if response.canceled() {
            self.tokens_of.remove(&id);
            if let Some(route) = self.routes.remove(&token) {
                let _ = route.responses.send(Box::new(response)).await;
            }
            return;
        }
        if response.events().is_empty() {
            return;
        }
        let Some(route) = self.routes.get(&token) else {
            return;
        };
        if route.responses.send(Box::new(response)).await.is_err() {
            self.routes.remove(&token);
            self.tokens_of.remove(&id);
            self.cancel(id).await;
        }
    }

    async fn cancel(&mut self, id: i64) {
        if let Some((sender, _)) = &mut self.stream {
            // A stream too broken to take the cancel ends every watch anyway.
            let _ = sender.cancel(id).await;
        }
    }

    /// Ends every watch: their channels close, and each reader re-reads
    /// its partition and watches again, on a new stream.
    fn broken(&mut self, error: Error) {
        tracing::debug!(%error, watches = self.routes.len(), "shared watch stream ended");
        self.stream = None;
        self.pending.clear();
        self.routes.clear();
        self.tokens_of.clear();
    }
}

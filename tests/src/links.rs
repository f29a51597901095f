//! Network faults between test nodes: a loopback TCP proxy for every
//! directed link `from -> to` of a cluster's peer traffic. Node `from` is
//! told that node `to`'s peer address is the proxy's, so every connection
//! `from` opens to `to` (its calls and their replies) goes through it, while
//! `to`'s own calls to `from` use the reverse link. Cutting one link is a
//! one-way partition; cutting both, a partition.
//!
//! A cut link either refuses (existing connections are reset, new ones
//! closed at once: the caller fails fast) or black-holes (connections stay
//! open and bytes are held: the caller waits out its deadline, as behind a
//! dead switch). Healing forwards again; a black-holed connection that was
//! left waiting is reset then, as a router that lost its state would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a link does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Forwards bytes both ways.
    Up,
    /// Resets connections and closes new ones at once.
    Refuse,
    /// Holds connections open but moves no bytes.
    Blackhole,
}

/// One directed link's proxy.
#[derive(Debug)]
struct Link {
    listen: SocketAddr,
    state: watch::Sender<LinkState>,
}

/// Every directed link between the nodes of a cluster.
#[derive(Debug, Default)]
pub struct Links {
    links: Mutex<BTreeMap<(u64, u64), Link>>,
}

impl Links {
    /// Starts a proxy for `from -> to` forwarding to `target`; returns the
    /// address `from` must use for `to`.
    pub async fn add(
        self: &Arc<Self>,
        from: u64,
        to: u64,
        target: SocketAddr,
    ) -> Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let (state, watch) = watch::channel(LinkState::Up);
        tokio::spawn(accept(listener, target, watch));
        self.links
            .lock()
            .map_err(|_| anyhow::anyhow!("links lock poisoned"))?
            .insert((from, to), Link { listen, state });
        Ok(listen)
    }

    /// Sets one directed link.
    pub fn set(&self, from: u64, to: u64, state: LinkState) {
        if let Ok(links) = self.links.lock()
            && let Some(link) = links.get(&(from, to))
        {
            let _ = link.state.send(state);
        }
    }

    /// Cuts (or heals) both directions between `a` and `b`.
    pub fn set_both(&self, a: u64, b: u64, state: LinkState) {
        self.set(a, b, state);
        self.set(b, a, state);
    }

    /// Isolates `node` from every other node in both directions.
    pub fn isolate(&self, node: u64, state: LinkState) {
        let pairs: Vec<(u64, u64)> = match self.links.lock() {
            Ok(links) => links.keys().copied().collect(),
            Err(_) => return,
        };
        for (from, to) in pairs {
            if from == node || to == node {
                self.set(from, to, state);
            }
        }
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        if let Ok(links) = self.links.lock() {
            for link in links.values() {
                let _ = link.state.send(LinkState::Up);
            }
        }
    }

    /// The proxy address of `from -> to`.
    pub fn addr(&self, from: u64, to: u64) -> Option<SocketAddr> {
        self.links.lock().ok()?.get(&(from, to)).map(|l| l.listen)
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, mut state: watch::Receiver<LinkState>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // The link's owner is gone: stop listening.
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let Ok((inbound, _)) = accepted else {
            return;
        };
        if *state.borrow() == LinkState::Refuse {
            drop(inbound);
            continue;
        }
        tokio::spawn(proxy(inbound, target, state.clone()));
    }
}

/// Forwards one connection until either side closes or the link is cut.
async fn proxy(inbound: TcpStream, target: SocketAddr, mut state: watch::Receiver<LinkState>) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    loop {
        let current = *state.borrow_and_update();
        match current {
            LinkState::Refuse => return,
            LinkState::Blackhole => {
                // Hold everything until the link changes; then reset.
                let _ = state.changed().await;
                return;
            }
            LinkState::Up => {}
        }
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            read = in_read.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out_write.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            read = out_read.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if in_write.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

//! A test's network (`windowsTest`): each node is a session of its own, with its own switch on
//! which its guest is 192.168.0.1 and its controller 192.168.0.2 (a revived pair keeps the
//! addresses, MACs and devices it was saved with). The nodes reach each other through this
//! forwarder: plugged into every node's switch, it answers ARP for the other nodes' test
//! addresses ([`crate::spec::TEST_NET_PREFIX`]`.N`) with its own MAC (proxy ARP), and hands
//! each IPv4 frame sent to it for node N to node N's switch, addressed to its guest. It is an
//! Ethernet hop, not a router: the IP packet is passed on as it came. Every frame it passes
//! on is written into a capture of the test network.

use super::qemu::GUEST_MAC;
use super::sys::vdeplug::Plug;
use crate::format::pcap::PcapWriter;
use std::io::BufWriter;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// The forwarder's own MAC on every node's switch (locally administered).
pub const FORWARDER_MAC: [u8; 6] = [0x02, 0x57, 0x49, 0x4e, 0x56, 0x4d];
/// How long a wait for frames lasts before the forwarder looks for new switches.
const POLL: Duration = Duration::from_millis(50);
/// The test network's capture stops growing here.
pub const CAPTURE_LIMIT_MIB: u64 = 64;

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;

/// One node: its address on the test network, and its switch's control folder (which
/// appears when the node starts, and is replaced when it starts again).
#[derive(Debug, Clone)]
pub struct Node {
    pub address: Ipv4Addr,
    pub switch_ctl: PathBuf,
}

/// What to do with a frame that came from one node's switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this frame back into the same switch (an ARP reply).
    Reply(Vec<u8>),
    /// Send this frame into node `to`'s switch.
    Forward {
        to: usize,
        frame: Vec<u8>,
    },
    Ignore,
}

fn mac(text: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').take(6).enumerate() {
        m[i] = u8::from_str_radix(part, 16).unwrap_or(0);
    }
    m
}

fn ip_at(frame: &[u8], at: usize) -> Option<Ipv4Addr> {
    frame.get(at..at + 4).map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// The forwarder's decision for `frame`, which came from node `from`'s switch; `nodes` are
/// the test addresses, by node index. Pure: the unit tests drive it with made-up frames.
pub fn route(from: usize, frame: &[u8], nodes: &[Ipv4Addr]) -> Action {
    if frame.len() < 14 {
        return Action::Ignore;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let other = |addr: Ipv4Addr| nodes.iter().position(|n| *n == addr).filter(|&i| i != from);
    match ethertype {
        // An ARP request (Ethernet, IPv4) for another node's address: we are that address here.
        ETH_ARP if frame.len() >= 42 && frame[14..22] == [0, 1, 8, 0, 6, 4, 0, 1] => {
            let (Some(target), Some(sender_ip)) = (ip_at(frame, 38), ip_at(frame, 28)) else { return Action::Ignore };
            if other(target).is_none() {
                return Action::Ignore;
            }
            let sender_mac = &frame[22..28];
            let mut reply = Vec::with_capacity(42);
            reply.extend_from_slice(sender_mac);
            reply.extend_from_slice(&FORWARDER_MAC);
            reply.extend_from_slice(&ETH_ARP.to_be_bytes());
            reply.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
            reply.extend_from_slice(&FORWARDER_MAC);
            reply.extend_from_slice(&target.octets());
            reply.extend_from_slice(sender_mac);
            reply.extend_from_slice(&sender_ip.octets());
            Action::Reply(reply)
        }
        ETH_IPV4 if frame[0..6] == FORWARDER_MAC && frame.len() >= 34 => {
            let Some(to) = ip_at(frame, 30).and_then(other) else { return Action::Ignore };
            let mut out = frame.to_vec();
            out[0..6].copy_from_slice(&mac(GUEST_MAC));
            out[6..12].copy_from_slice(&FORWARDER_MAC);
            Action::Forward { to, frame: out }
        }
        _ => Action::Ignore,
    }
}

/// The running forwarder; dropping it stops its thread and flushes the capture.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts forwarding between `nodes`, writing what it passes on into `capture`.
    pub fn start(nodes: Vec<Node>, capture: &Path) -> std::io::Result<Forwarder> {
        let file = std::fs::File::create(capture)?;
        let pcap = PcapWriter::new(BufWriter::new(file), CAPTURE_LIMIT_MIB << 20)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread =
            std::thread::Builder::new().name("test network".into()).spawn(move || forward(nodes, pcap, &stopped))?;
        Ok(Forwarder { stop, thread: Some(thread) })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn forward(nodes: Vec<Node>, mut pcap: PcapWriter<BufWriter<std::fs::File>>, stop: &AtomicBool) {
    let addresses: Vec<Ipv4Addr> = nodes.iter().map(|n| n.address).collect();
    let mut plugs: Vec<Option<Plug>> = nodes.iter().map(|_| None).collect();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // A node that started (or started again) has a switch to plug into.
        for (plug, node) in plugs.iter_mut().zip(&nodes) {
            if plug.is_none() && node.switch_ctl.join("ctl").exists() {
                *plug = Plug::open(&node.switch_ctl, "nix-winvm test network").ok();
            }
        }
        let live: Vec<usize> = (0..plugs.len()).filter(|&i| plugs[i].is_some()).collect();
        if live.is_empty() {
            std::thread::sleep(POLL);
            continue;
        }
        let fds: Vec<_> = live
            .iter()
            .flat_map(|&i| {
                let p = plugs[i].as_ref().expect("live");
                [p.data_fd(), p.ctl_fd()]
            })
            .collect();
        let ready = match super::sys::wait_readable(&fds, Some(POLL)) {
            Ok(r) => r,
            Err(_) => continue,
        };
        drop(fds);
        for (k, &i) in live.iter().enumerate() {
            if ready[2 * k + 1] {
                // The switch has gone (the node stopped): plug in again when it is back.
                plugs[i] = None;
                continue;
            }
            if !ready[2 * k] {
                continue;
            }
            let Some(plug) = plugs[i].as_mut() else { continue };
            let n = match plug.recv(&mut buf) {
                Ok(n) => n,
                Err(_) => {
                    plugs[i] = None;
                    continue;
                }
            };
            let (to, frame) = match route(i, &buf[..n], &addresses) {
                Action::Reply(frame) => (i, frame),
                Action::Forward { to, frame } => (to, frame),
                Action::Ignore => continue,
            };
            let _ = pcap.frame(SystemTime::now(), &frame);
            if let Some(out) = plugs[to].as_mut() {
                let _ = out.send(&frame);
            }
        }
    }
    let _ = pcap.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const B: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

    fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&ETH_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&sender.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        f
    }

    fn ipv4(dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut f = dst_mac.to_vec();
        f.extend_from_slice(&mac(GUEST_MAC));
        f.extend_from_slice(&ETH_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        f.extend_from_slice(&ip);
        f
    }

    #[test]
    fn arp_for_another_node_is_answered_with_the_forwarders_mac() {
        let guest = mac(GUEST_MAC);
        let Action::Reply(r) = route(0, &arp_request(guest, A, B), &[A, B]) else { panic!("no reply") };
        assert_eq!(&r[0..6], &guest);
        assert_eq!(&r[6..12], &FORWARDER_MAC);
        assert_eq!(&r[20..22], &[0, 2]);
        assert_eq!(&r[22..28], &FORWARDER_MAC);
        assert_eq!(ip_at(&r, 28), Some(B));
        assert_eq!(ip_at(&r, 38), Some(A));
    }

    #[test]
    fn arp_for_the_nodes_own_address_or_the_session_network_is_left_alone() {
        let guest = mac(GUEST_MAC);
        // A duplicate-address probe for its own address, and the controller's address.
        assert_eq!(route(0, &arp_request(guest, Ipv4Addr::UNSPECIFIED, A), &[A, B]), Action::Ignore);
        assert_eq!(route(0, &arp_request(guest, A, Ipv4Addr::new(192, 168, 0, 2)), &[A, B]), Action::Ignore);
    }

    #[test]
    fn ipv4_sent_to_the_forwarder_reaches_the_other_nodes_guest_unchanged() {
        let frame = ipv4(FORWARDER_MAC, A, B);
        let Action::Forward { to, frame: out } = route(0, &frame, &[A, B]) else { panic!("not forwarded") };
        assert_eq!(to, 1);
        assert_eq!(&out[0..6], &mac(GUEST_MAC));
        assert_eq!(&out[6..12], &FORWARDER_MAC);
        assert_eq!(&out[12..], &frame[12..]);
        // Frames between a guest and its controller are not the forwarder's.
        assert_eq!(route(0, &ipv4(mac("52:54:00:12:01:02"), A, B), &[A, B]), Action::Ignore);
        assert_eq!(route(0, &ipv4(FORWARDER_MAC, B, A), &[A, B]), Action::Ignore);
    }
}

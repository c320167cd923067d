//! A minimal MaxMind DB (MMDB v2) writer for tests: IPv4 prefixes mapped to a country's ISO code,
//! in the layout GeoLite2-Country uses (`{"country": {"iso_code": ..}}`), so the keyholder's
//! `--geo` rule reads a database built here rather than one downloaded. Format: a binary search
//! tree of 24-bit records, a 16-byte separator, the data section, then the metadata after
//! `\xAB\xCD\xEFMaxMind.com` (https://maxmind.github.io/MaxMind-DB/).

use std::net::Ipv4Addr;

fn control(kind: u8, size: usize, out: &mut Vec<u8>) {
    assert!(size < 29);
    if kind <= 7 {
        out.push((kind << 5) | size as u8);
    } else {
        out.push(size as u8);
        out.push(kind - 7);
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    control(2, s.len(), out);
    out.extend_from_slice(s.as_bytes());
}

fn uint(kind: u8, value: u64, out: &mut Vec<u8>) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    control(kind, 8 - skip, out);
    out.extend_from_slice(&bytes[skip..]);
}

#[derive(Default)]
struct Node {
    children: [Option<Box<Node>>; 2],
    data: Option<usize>,
}

/// Builds a database where each `(network, prefix length, ISO code)` maps to that country.
pub fn country_db(entries: &[(Ipv4Addr, u8, &str)]) -> Vec<u8> {
    // Data section: one record per distinct entry.
    let mut data = Vec::new();
    let mut root = Node::default();
    for (net, len, iso) in entries {
        let offset = data.len();
        control(7, 1, &mut data);
        string("country", &mut data);
        control(7, 1, &mut data);
        string("iso_code", &mut data);
        string(iso, &mut data);
        let bits = u32::from(*net);
        let mut node = &mut root;
        for i in 0..*len {
            let bit = ((bits >> (31 - i)) & 1) as usize;
            node = node.children[bit].get_or_insert_with(Box::default);
        }
        node.data = Some(offset);
    }
    // Number the inner nodes breadth first.
    let mut order: Vec<&Node> = vec![&root];
    let mut i = 0;
    while i < order.len() {
        for child in order[i].children.iter().flatten() {
            if child.data.is_none() {
                order.push(child);
            }
        }
        i += 1;
    }
    let node_count = order.len();
    let index_of = |target: &Node| order.iter().position(|n| std::ptr::eq(*n, target)).unwrap();
    let mut tree = Vec::new();
    for node in &order {
        for child in &node.children {
            let record = match child {
                None => node_count,
                Some(c) => match c.data {
                    Some(offset) => node_count + 16 + offset,
                    None => index_of(c),
                },
            };
            tree.extend_from_slice(&(record as u32).to_be_bytes()[1..]);
        }
    }
    let mut out = tree;
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    control(7, 9, &mut out);
    string("binary_format_major_version", &mut out);
    uint(5, 2, &mut out);
    string("binary_format_minor_version", &mut out);
    uint(5, 0, &mut out);
    string("build_epoch", &mut out);
    uint(9, 1_700_000_000, &mut out);
    string("database_type", &mut out);
    string("Keyholder-Test-Country", &mut out);
    string("description", &mut out);
    control(7, 1, &mut out);
    string("en", &mut out);
    string("test countries", &mut out);
    string("ip_version", &mut out);
    uint(5, 4, &mut out);
    string("languages", &mut out);
    control(11, 1, &mut out);
    string("en", &mut out);
    string("node_count", &mut out);
    uint(6, node_count as u64, &mut out);
    string("record_size", &mut out);
    uint(5, 24, &mut out);
    out
}

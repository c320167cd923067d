//! Merkle tree hashing and inclusion proofs as in RFC 9162 §2.1 (Certificate Transparency), over
//! SHA-256: what lets one Ed25519 signature cover a batch of responses (see [`crate::response_sig`]).

use sha2::{Digest as _, Sha256};

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 || parts...)`: the hash of a leaf (the prefix keeps leaves and nodes apart).
pub fn leaf_hash(parts: &[&[u8]]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// `SHA-256(0x01 || left || right)`: the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The root over `leaves` (leaf hashes, at least one) and the inclusion proof of each leaf, in the
/// order of RFC 9162 §2.1.3.1 (from the leaf's sibling up to the root's child).
pub fn root_and_proofs(leaves: &[Hash]) -> Option<(Hash, Vec<Vec<Hash>>)> {
    if leaves.is_empty() {
        return None;
    }
    let mut proofs = vec![Vec::new(); leaves.len()];
    let root = subtree(leaves, &mut proofs);
    Some((root, proofs))
}

fn subtree(leaves: &[Hash], proofs: &mut [Vec<Hash>]) -> Hash {
    if let [leaf] = leaves {
        return *leaf;
    }
    // The largest power of two smaller than the number of leaves goes left.
    let split = 1usize << (usize::BITS - 1 - (leaves.len() - 1).leading_zeros());
    let (left_leaves, right_leaves) = leaves.split_at(split);
    let (left_proofs, right_proofs) = proofs.split_at_mut(split);
    let left = subtree(left_leaves, left_proofs);
    let right = subtree(right_leaves, right_proofs);
    left_proofs.iter_mut().for_each(|p| p.push(right));
    right_proofs.iter_mut().for_each(|p| p.push(left));
    node_hash(&left, &right)
}

/// The root that leaf `index` of a tree of `size` leaves with hash `leaf` and inclusion proof `path`
/// leads to (RFC 9162 §2.1.3.2); `None` when the proof does not have exactly the length such a tree
/// needs or the index is outside the tree.
pub fn root_from_proof(index: u64, size: u64, leaf: &Hash, path: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if s_n == 0 {
            return None;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            while f_n & 1 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    (s_n == 0).then_some(r)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn h(hex: &str) -> Hash {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex, &mut out).unwrap();
        out
    }

    /// The inputs and tree heads every Certificate Transparency implementation is tested against.
    const INPUTS: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn reference_leaves() -> Vec<Hash> {
        INPUTS
            .iter()
            .map(|i| leaf_hash(&[&hex::decode(i).unwrap()]))
            .collect()
    }

    #[test]
    fn roots_and_proofs_match_the_reference_vectors() {
        let leaves = reference_leaves();
        for size in 1..=8 {
            let (root, _) = root_and_proofs(&leaves[..size]).unwrap();
            assert_eq!(root, h(ROOTS[size - 1]), "size {size}");
        }
        let (_, proofs) = root_and_proofs(&leaves).unwrap();
        assert_eq!(
            proofs[0],
            [
                h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
            ]
        );
        assert_eq!(
            proofs[5],
            [
                h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
            ]
        );
        assert!(root_and_proofs(&[]).is_none());
    }

    #[test]
    fn every_proof_verifies_and_nothing_else_does() {
        let leaves: Vec<Hash> = (0..70u8).map(|i| leaf_hash(&[&[i, i ^ 0x5a]])).collect();
        for size in 1..=leaves.len() {
            let (root, proofs) = root_and_proofs(&leaves[..size]).unwrap();
            let size = size as u64;
            for (index, proof) in proofs.iter().enumerate() {
                let index = index as u64;
                let leaf = &leaves[index as usize];
                assert_eq!(root_from_proof(index, size, leaf, proof), Some(root));
                // Another leaf or index, or a proof one hash short or long, is refused.
                let other = leaf_hash(&[b"other"]);
                assert_ne!(root_from_proof(index, size, &other, proof), Some(root));
                if size > 1 {
                    assert_ne!(
                        root_from_proof((index + 1) % size, size, leaf, proof),
                        Some(root)
                    );
                    assert_ne!(root_from_proof(index, size, leaf, &proof[1..]), Some(root));
                    let mut flipped = proof.clone();
                    flipped[0][0] ^= 1;
                    assert_ne!(root_from_proof(index, size, leaf, &flipped), Some(root));
                }
                // (The same proof can fit another tree size: the signed batch message names the
                // size for that reason.)
                let mut longer = proof.clone();
                longer.push(root);
                assert_eq!(root_from_proof(index, size, leaf, &longer), None);
                assert_eq!(root_from_proof(size, size, leaf, proof), None);
            }
        }
    }
}

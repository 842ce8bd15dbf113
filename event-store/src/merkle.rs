//! A Merkle tree over the log in commit order, as in Certificate Transparency (RFC 6962 §2.1,
//! RFC 9162 §2.1): leaf hash = SHA-256(0x00 ‖ leaf data), node = SHA-256(0x01 ‖ left ‖ right),
//! the tree over `n` leaves split at the largest power of two below `n`. No IO.
//!
//! Owns three things:
//! - [`Frontier`]: the roots of the perfect subtrees of a tree (at most 64 hashes), which is
//!   all an append-only tree needs to take more leaves and to give its root. Sealing keeps it
//!   between checkpoints, so a seal reads only the events committed since the last one.
//! - [`inclusion_proof`]: an RFC 6962 audit path computed in one pass over the leaves, keeping
//!   a frontier per sibling subtree (O(log n) memory, however large the log).
//! - [`verify_inclusion`]: the RFC 9162 §2.1.3.2 check a client runs offline.
//!
//! Why not a crate: `ct-merkle` implements the same tree but keeps every leaf and node in
//! memory (the whole log, for every proof), and `rs_merkle` has no 0x00/0x01 domain separation
//! unless one writes a custom hasher. What Tally needs is the frontier and a streaming proof,
//! about a hundred lines, pinned below to the RFC 6962 reference vectors that every CT
//! implementation is tested against.

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of no bytes.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// SHA-256(0x00 ‖ `data`).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x00]);
    hasher.update(data);
    hasher.finalize().into()
}

/// SHA-256(0x01 ‖ `left` ‖ `right`).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x01]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The leaf of one event (`schemas/CHECKPOINT.md`): its place in commit order and its
/// hash-chain hash, fixed-width, so no two events can give the same bytes. The place is in
/// the leaf so that moving an event (a new position or transaction id) changes the tree even
/// when the sequence of event hashes stays the same.
pub fn event_leaf_hash(tx_id: i64, position: i64, event_hash: &[u8]) -> Hash {
    let mut data = Vec::with_capacity(16 + event_hash.len());
    data.extend_from_slice(&tx_id.to_be_bytes());
    data.extend_from_slice(&position.to_be_bytes());
    data.extend_from_slice(event_hash);
    leaf_hash(&data)
}

/// The right edge of an append-only tree: for each set bit of `size`, from the highest, the
/// root of the perfect subtree of that many leaves, left to right.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Self {
        Self::default()
    }

    /// A frontier as stored; `None` unless there is one node per set bit of `size`.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(Self { size, nodes })
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    /// Adds the next leaf (its [`leaf_hash`]): merges the perfect subtrees it completes.
    pub fn push(&mut self, leaf: Hash) {
        let mut hash = leaf;
        let mut size = self.size;
        while size & 1 == 1 {
            let left = self.nodes.pop().expect("one node per set bit of size");
            hash = node_hash(&left, &hash);
            size >>= 1;
        }
        self.nodes.push(hash);
        self.size += 1;
    }

    /// The root of the tree over the leaves so far (RFC 6962 MTH).
    pub fn root(&self) -> Hash {
        let mut nodes = self.nodes.iter().rev();
        let Some(last) = nodes.next() else {
            return empty_root();
        };
        nodes.fold(*last, |right, left| node_hash(left, &right))
    }
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// The leaf ranges `[start, end)` whose roots form the audit path of leaf `index` in a tree of
/// `size` leaves, in path order (nearest the leaf first). RFC 6962 §2.1.1 PATH.
pub fn inclusion_ranges(index: u64, size: u64) -> Vec<(u64, u64)> {
    fn walk(index: u64, lo: u64, hi: u64, out: &mut Vec<(u64, u64)>) {
        if hi - lo <= 1 {
            return;
        }
        let mid = lo + split(hi - lo);
        if index < mid {
            walk(index, lo, mid, out);
            out.push((mid, hi));
        } else {
            walk(index, mid, hi, out);
            out.push((lo, mid));
        }
    }
    assert!(index < size, "leaf {index} is not in a tree of {size}");
    let mut out = Vec::new();
    walk(index, 0, size, &mut out);
    out
}

/// A proof and the root it proves against, from one pass over the tree's leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    pub leaf_index: u64,
    pub tree_size: u64,
    pub leaf: Hash,
    pub path: Vec<Hash>,
    /// The root of the leaves given: compare it with the checkpoint's before serving the proof.
    pub root: Hash,
}

/// The audit path of leaf `index` from the first `size` `leaves` (leaf hashes, in order),
/// streaming: memory is O(log size). `None` when `leaves` ends before `size` or `index` is
/// not below `size`.
pub fn inclusion_proof(leaves: impl IntoIterator<Item = Hash>, index: u64, size: u64) -> Option<InclusionProof> {
    let mut builder = ProofBuilder::new(index, size)?;
    for leaf in leaves.into_iter().take(size as usize) {
        builder.push(leaf);
    }
    builder.finish()
}

/// [`inclusion_proof`] fed one leaf at a time (the leaves come from the database in pages).
#[derive(Debug)]
pub struct ProofBuilder {
    index: u64,
    size: u64,
    /// The path's ranges in path order, and for each the frontier of its leaves so far.
    ranges: Vec<(u64, u64)>,
    partial: Vec<Frontier>,
    whole: Frontier,
    leaf: Option<Hash>,
}

impl ProofBuilder {
    /// `None` unless `index < size`.
    pub fn new(index: u64, size: u64) -> Option<Self> {
        if index >= size {
            return None;
        }
        let ranges = inclusion_ranges(index, size);
        let partial = vec![Frontier::new(); ranges.len()];
        Some(Self {
            index,
            size,
            ranges,
            partial,
            whole: Frontier::new(),
            leaf: None,
        })
    }

    /// Leaves taken so far.
    pub fn pushed(&self) -> u64 {
        self.whole.size()
    }

    /// Takes the next leaf; leaves beyond the tree size are ignored.
    pub fn push(&mut self, leaf: Hash) {
        let i = self.whole.size();
        if i >= self.size {
            return;
        }
        self.whole.push(leaf);
        if i == self.index {
            self.leaf = Some(leaf);
            return;
        }
        // The ranges cover every other leaf exactly once; there are at most 64 of them.
        if let Some(k) = self.ranges.iter().position(|&(lo, hi)| lo <= i && i < hi) {
            self.partial[k].push(leaf);
        }
    }

    /// The proof, once all `size` leaves were pushed.
    pub fn finish(self) -> Option<InclusionProof> {
        if self.whole.size() != self.size {
            return None;
        }
        Some(InclusionProof {
            leaf_index: self.index,
            tree_size: self.size,
            leaf: self.leaf?,
            path: self.partial.iter().map(Frontier::root).collect(),
            root: self.whole.root(),
        })
    }
}

/// Whether `path` proves leaf `leaf` at `index` in the tree of `size` leaves whose root is
/// `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The leaf inputs of the RFC 6962 reference tests (certificate-transparency's
    /// `merkle_test`), and the tree heads of their first 0..=8.
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
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
        LEAVES.iter().map(|l| leaf_hash(&hex::decode(l).unwrap())).collect()
    }

    fn h(text: &str) -> Hash {
        hex::decode(text).unwrap().try_into().unwrap()
    }

    /// RFC 6962 MTH, written from the definition: the oracle for the frontier and the proofs.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    #[test]
    fn the_roots_of_the_rfc_6962_reference_tree_match_at_every_size() {
        let leaves = reference_leaves();
        let mut frontier = Frontier::new();
        assert_eq!(hex::encode(frontier.root()), ROOTS[0]);
        for (n, leaf) in leaves.iter().enumerate() {
            frontier.push(*leaf);
            assert_eq!(hex::encode(frontier.root()), ROOTS[n + 1], "size {}", n + 1);
        }
    }

    #[test]
    fn the_rfc_6962_reference_inclusion_paths_are_produced_and_verify() {
        let leaves = reference_leaves();
        let root = h(ROOTS[8]);
        let cases: [(u64, &[&str]); 2] = [
            (
                0,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (index, expected) in cases {
            let proof = inclusion_proof(leaves.clone(), index, 8).unwrap();
            let expected: Vec<Hash> = expected.iter().map(|p| h(p)).collect();
            assert_eq!(proof.path, expected, "leaf {index}");
            assert_eq!(proof.root, root);
            assert!(verify_inclusion(&leaves[index as usize], index, 8, &expected, &root));
        }
    }

    #[test]
    fn every_leaf_proves_in_every_tree_size_and_a_wrong_leaf_index_or_root_does_not() {
        let leaves: Vec<Hash> = (0..37u8).map(|i| leaf_hash(&[i, i.wrapping_mul(7)])).collect();
        for size in 1..=leaves.len() as u64 {
            let root = mth(&leaves[..size as usize]);
            for index in 0..size {
                let proof = inclusion_proof(leaves.iter().copied(), index, size).unwrap();
                assert_eq!(proof.root, root, "size {size}");
                assert_eq!(proof.leaf, leaves[index as usize]);
                assert!(verify_inclusion(&proof.leaf, index, size, &proof.path, &root));
                let other = leaves[((index + 1) % size) as usize];
                if size > 1 {
                    assert!(!verify_inclusion(&other, index, size, &proof.path, &root));
                    assert!(!verify_inclusion(
                        &proof.leaf,
                        (index + 1) % size,
                        size,
                        &proof.path,
                        &root
                    ));
                }
                assert!(!verify_inclusion(&proof.leaf, index, size, &proof.path, &leaves[0]) || size == 1);
                // (A path may also fit a tree one leaf larger whose shape is the same there:
                // the root, which the signature covers with the size, is what binds the size.)
            }
        }
    }

    #[test]
    fn a_frontier_matches_the_definition_and_round_trips_through_its_parts() {
        let leaves: Vec<Hash> = (0..100u8).map(|i| leaf_hash(&[i])).collect();
        let mut frontier = Frontier::new();
        for (n, leaf) in leaves.iter().enumerate() {
            frontier.push(*leaf);
            assert_eq!(frontier.root(), mth(&leaves[..=n]));
            let copy = Frontier::from_parts(frontier.size(), frontier.nodes().to_vec()).unwrap();
            assert_eq!(copy, frontier);
        }
        assert_eq!(Frontier::from_parts(3, vec![leaves[0]]), None);
    }

    #[test]
    fn a_proof_needs_every_leaf_of_its_tree() {
        let leaves: Vec<Hash> = (0..5u8).map(|i| leaf_hash(&[i])).collect();
        assert_eq!(inclusion_proof(leaves.iter().copied(), 1, 6), None);
        assert_eq!(inclusion_proof(leaves.iter().copied(), 5, 5), None);
        assert!(inclusion_proof(leaves.iter().copied(), 4, 5).is_some());
    }

    #[test]
    fn an_event_leaf_changes_with_its_place_and_its_hash() {
        let hash = [7u8; 32];
        let leaf = event_leaf_hash(10, 3, &hash);
        assert_ne!(leaf, event_leaf_hash(10, 4, &hash));
        assert_ne!(leaf, event_leaf_hash(11, 3, &hash));
        assert_ne!(leaf, event_leaf_hash(10, 3, &[8u8; 32]));
    }
}

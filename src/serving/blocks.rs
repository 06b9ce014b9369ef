//! The paged KV cache's bookkeeping: a pool of fixed-size blocks of positions, a block
//! table per sequence, and the prefix cache over them (as vLLM's automatic prefix
//! caching): every full block is named by a chain hash of its parent block's hash and
//! its own tokens, refcounted while sequences use it, and kept after they end, until its
//! memory is needed (least recently used first). No tensors here: the model's
//! [`PagedKv`](crate::model::qwen2::PagedKv) holds the keys and values at the block
//! indices this pool hands out.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// Positions per block.
pub const BLOCK_SIZE: usize = 32;

/// The chain hash of a full block: its parent's hash (none for the first) and its tokens.
pub fn chain_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: the same tokens give the same hash in every run.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    /// Set once the block is full and registered in the prefix cache.
    hash: Option<u64>,
    /// The tokens a hashed block holds (a hash match is checked against them).
    tokens: Vec<u32>,
    /// The block's key in the free set while `refs` is 0.
    free_key: Option<(u64, u32)>,
}

/// Blocks and their prefix-cache identities.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// Blocks no sequence uses, by eviction order: (0, id) for blocks holding nothing
    /// reusable, (last use, id) for cached ones, so the oldest cached block goes first.
    free: BTreeSet<(u64, u32)>,
    by_hash: HashMap<u64, u32>,
    clock: u64,
}

impl BlockPool {
    pub fn new(n_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "blocks hold at least one position");
        let n = u32::try_from(n_blocks).expect("fewer than 2^32 blocks");
        Self {
            block_size,
            blocks: (0..n)
                .map(|id| Block {
                    free_key: Some((0, id)),
                    ..Block::default()
                })
                .collect(),
            free: (0..n).map(|id| (0, id)).collect(),
            by_hash: HashMap::new(),
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (unused, cached or not).
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks whose contents the prefix cache can still give back.
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    fn take_free(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        if let Some(key) = b.free_key.take() {
            self.free.remove(&key);
        }
    }

    fn acquire(&mut self, id: u32) {
        if self.blocks[id as usize].refs == 0 {
            self.take_free(id);
        }
        self.blocks[id as usize].refs += 1;
    }

    /// A fresh block (its old cached contents, if any, forgotten); `None` when every
    /// block is in use.
    pub fn allocate(&mut self) -> Option<u32> {
        let &(key, id) = self.free.iter().next()?;
        self.free.remove(&(key, id));
        let b = &mut self.blocks[id as usize];
        b.free_key = None;
        if let Some(h) = b.hash.take() {
            if self.by_hash.get(&h) == Some(&id) {
                self.by_hash.remove(&h);
            }
        }
        b.tokens.clear();
        b.refs = 1;
        Some(id)
    }

    /// The longest run of cached full blocks that starts `tokens`, each taken for the
    /// caller (released with [`release`](Self::release)), with their hashes.
    pub fn match_prefix(&mut self, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let mut ids = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size) {
            let h = chain_hash(parent, chunk);
            let Some(&id) = self.by_hash.get(&h) else {
                break;
            };
            if self.blocks[id as usize].tokens != chunk {
                break; // a hash collision: not the same tokens
            }
            self.acquire(id);
            ids.push(id);
            hashes.push(h);
            parent = Some(h);
        }
        (ids, hashes)
    }

    /// Registers a block its sequence has just filled with `tokens` under the chain hash
    /// from `parent`; returns that hash. A block of the same contents already cached
    /// keeps its place (this one is then freed as uncached when released).
    pub fn seal(&mut self, id: u32, parent: Option<u64>, tokens: &[u32]) -> u64 {
        debug_assert_eq!(tokens.len(), self.block_size);
        let h = chain_hash(parent, tokens);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.by_hash.entry(h) {
            slot.insert(id);
            let b = &mut self.blocks[id as usize];
            b.hash = Some(h);
            b.tokens = tokens.to_vec();
        }
        h
    }

    /// Gives blocks back. A block no one uses any more stays cached (if it was sealed)
    /// until it is needed; later blocks of a sequence are evicted before earlier ones.
    pub fn release(&mut self, ids: &[u32]) {
        // Tail first, so a sequence's earlier blocks (more likely shared by the next
        // prompt) get newer keys and are evicted later.
        for &id in ids.iter().rev() {
            self.clock += 1;
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.refs > 0, "block {id} released more often than taken");
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 {
                let key = (if b.hash.is_some() { self.clock } else { 0 }, id);
                b.free_key = Some(key);
                self.free.insert(key);
            }
        }
    }
}

/// The blocks one sequence's positions live in, and the chain hashes of its full ones.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    /// Hashes of the first `hashes.len()` blocks (those sealed or matched).
    hashes: Vec<u64>,
}

impl BlockTable {
    /// A table starting with the cached blocks that match the start of `tokens`, at most
    /// `limit` positions of them; returns it and how many positions it already holds.
    pub fn with_prefix(pool: &mut BlockPool, tokens: &[u32], limit: usize) -> (Self, usize) {
        let limit = limit.min(tokens.len());
        let (blocks, hashes) = pool.match_prefix(&tokens[..limit]);
        let cached = blocks.len() * pool.block_size();
        (Self { blocks, hashes }, cached)
    }

    /// Adds blocks until `positions` fit; false (nothing added) when the pool lacks them.
    pub fn reserve(&mut self, pool: &mut BlockPool, positions: usize) -> bool {
        let need = pool.blocks_for(positions).saturating_sub(self.blocks.len());
        if need > pool.free_blocks() {
            return false;
        }
        for _ in 0..need {
            let id = pool.allocate().expect("counted free blocks");
            self.blocks.push(id);
        }
        true
    }

    /// Seals every block that `tokens[..computed]` fills and is not sealed yet.
    pub fn seal_full(&mut self, pool: &mut BlockPool, tokens: &[u32], computed: usize) {
        let bs = pool.block_size();
        let full = (computed / bs).min(self.blocks.len());
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let parent = i.checked_sub(1).map(|p| self.hashes[p]);
            let h = pool.seal(self.blocks[i], parent, &tokens[i * bs..(i + 1) * bs]);
            self.hashes.push(h);
        }
    }

    /// Gives every block back to the pool.
    pub fn release(&mut self, pool: &mut BlockPool) {
        pool.release(&self.blocks);
        self.blocks.clear();
        self.hashes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn a_released_sequence_leaves_its_full_blocks_for_the_next_prompt() {
        let mut pool = BlockPool::new(8, 4);
        let prompt = toks(10, 1);
        let (mut t, cached) = BlockTable::with_prefix(&mut pool, &prompt, 9);
        assert_eq!(cached, 0);
        assert!(t.reserve(&mut pool, 10));
        assert_eq!(t.blocks.len(), 3);
        t.seal_full(&mut pool, &prompt, 10);
        assert_eq!(pool.cached_blocks(), 2);
        let first = t.blocks.clone();
        t.release(&mut pool);
        assert_eq!(pool.free_blocks(), 8);

        // Same start, different end: the two full blocks come back, the same ones.
        let mut next = prompt[..8].to_vec();
        next.extend([99, 98, 97]);
        let (t2, cached) = BlockTable::with_prefix(&mut pool, &next, next.len() - 1);
        assert_eq!(cached, 8);
        assert_eq!(t2.blocks, first[..2]);
        // A prompt that differs in the first block shares nothing (the chain breaks).
        let mut other = prompt.clone();
        other[0] = 5;
        let (_, cached) = BlockTable::with_prefix(&mut pool, &other, other.len() - 1);
        assert_eq!(cached, 0);
        // The limit keeps the last prompt token to compute (its logits are needed).
        let exact = prompt[..8].to_vec();
        let (t3, cached) = BlockTable::with_prefix(&mut pool, &exact, exact.len() - 1);
        assert_eq!((cached, t3.blocks.len()), (4, 1));
    }

    #[test]
    fn shared_blocks_are_counted_and_only_evicted_when_unused() {
        let mut pool = BlockPool::new(4, 2);
        let p = toks(4, 3);
        let (mut a, _) = BlockTable::with_prefix(&mut pool, &p, 3);
        assert!(a.reserve(&mut pool, 4));
        a.seal_full(&mut pool, &p, 4);
        let (mut b, cached) = BlockTable::with_prefix(&mut pool, &p, 4);
        assert_eq!(cached, 4);
        assert_eq!(pool.free_blocks(), 2);
        a.release(&mut pool);
        // b still holds both: they are not free.
        assert_eq!(pool.free_blocks(), 2);
        let mut c = BlockTable::default();
        assert!(c.reserve(&mut pool, 4));
        assert!(!c.reserve(&mut pool, 6), "the pool is full");
        assert_eq!(c.blocks.len(), 2);
        b.release(&mut pool);
        c.release(&mut pool);
        // Cached blocks are evicted least recently used first, uncached ones before them.
        assert_eq!(pool.free_blocks(), 4);
        let mut d = BlockTable::default();
        assert!(d.reserve(&mut pool, 4));
        assert_eq!(
            pool.cached_blocks(),
            2,
            "c's two uncached blocks went first"
        );
        assert!(d.reserve(&mut pool, 6));
        assert_eq!(
            pool.cached_blocks(),
            1,
            "then p's last block, keeping its first"
        );
        let (_, cached) = BlockTable::with_prefix(&mut pool, &p, 4);
        assert_eq!(cached, 2);
    }

    #[test]
    fn a_colliding_hash_with_other_tokens_is_not_a_match() {
        let mut pool = BlockPool::new(2, 2);
        let id = pool.allocate().unwrap();
        let h = chain_hash(None, &[1, 2]);
        pool.by_hash.insert(h, id);
        pool.blocks[id as usize].hash = Some(h);
        pool.blocks[id as usize].tokens = vec![3, 4];
        assert_eq!(pool.match_prefix(&[1, 2]).0, Vec::<u32>::new());
    }
}

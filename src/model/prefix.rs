//! The prefix cache's index: full KV pages known by their content, so a run whose prompt starts
//! with what an earlier run computed — a conversation's next turn, the same image under another
//! question, a shared system prompt — reads those pages instead of computing them again.
//!
//! A page's content is its [`PAGE`] positions ([`Tok`]: a text id, or an image and patch) *and*
//! everything before it, since a key or value depends on every earlier position: a node is keyed
//! by its parent node and its own positions, and a prompt's pages are found by walking from the
//! root. Keys are compared whole (no hash that a client could make collide). An image is known
//! by the address of its features, which every node naming it keeps alive, so the address cannot
//! be reused by another image while a node could match it; the same pixels under two different
//! feature tensors simply miss.
//!
//! Bounded in pages; the least recently used leaf goes first (a node's children are keyed by it,
//! so it leaves only after them).

use std::collections::HashMap;

use super::kv::PAGE;

/// One position's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tok {
    Text(u32),
    /// Patch `patch` of the image whose features live at `image`.
    Image {
        image: usize,
        patch: u32,
    },
}

/// A full page's positions.
pub type PageKey = [Tok; PAGE];

/// The id of the root, the empty prefix every chain starts from.
pub const ROOT: u64 = 0;

struct Node<T> {
    page: u32,
    parent: u64,
    key: PageKey,
    children: u32,
    used: u64,
    payload: T,
}

/// Full pages by content; `T` is what a node keeps beside its page.
pub struct Prefixes<T> {
    nodes: HashMap<u64, Node<T>>,
    index: HashMap<(u64, PageKey), u64>,
    next: u64,
    clock: u64,
    /// Nodes the cache keeps at most (0: off).
    pub max_pages: usize,
}

impl<T> Default for Prefixes<T> {
    fn default() -> Self {
        Prefixes {
            nodes: HashMap::new(),
            index: HashMap::new(),
            next: ROOT + 1,
            clock: 0,
            max_pages: 0,
        }
    }
}

impl<T> Prefixes<T> {
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node continuing `parent` with `key`, if cached.
    pub fn child(&self, parent: u64, key: &PageKey) -> Option<u64> {
        self.index.get(&(parent, *key)).copied()
    }

    /// The longest cached chain of `keys` from the root: per page, its node and page. Every node
    /// found counts as just used.
    pub fn lookup(&mut self, keys: &[PageKey]) -> Vec<(u64, u32)> {
        let mut found = Vec::new();
        let mut parent = ROOT;
        for key in keys {
            let Some(id) = self.child(parent, key) else {
                break;
            };
            self.clock += 1;
            let node = self.nodes.get_mut(&id).expect("an indexed node exists");
            node.used = self.clock;
            found.push((id, node.page));
            parent = id;
        }
        found
    }

    pub fn page(&self, id: u64) -> u32 {
        self.nodes[&id].page
    }

    pub fn payload(&self, id: u64) -> &T {
        &self.nodes[&id].payload
    }

    /// Caches `page` as `key` after `parent` (which must be [`ROOT`] or a cached node that has
    /// no child with this key) and returns its id; the caller gives the cache its own reference
    /// to the page.
    pub fn insert(&mut self, parent: u64, key: PageKey, page: u32, payload: T) -> u64 {
        debug_assert!(self.child(parent, &key).is_none());
        let id = self.next;
        self.next += 1;
        self.clock += 1;
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children += 1;
        }
        self.index.insert((parent, key), id);
        self.nodes.insert(
            id,
            Node {
                page,
                parent,
                key,
                children: 0,
                used: self.clock,
                payload,
            },
        );
        id
    }

    /// Removes the least recently used leaf whose page `evictable` accepts, giving back its page
    /// (the caller drops the cache's reference to it).
    pub fn evict(&mut self, evictable: impl Fn(u32) -> bool) -> Option<u32> {
        let id = self
            .nodes
            .iter()
            .filter(|(_, n)| n.children == 0 && evictable(n.page))
            .min_by_key(|(_, n)| n.used)
            .map(|(&id, _)| id)?;
        let node = self.nodes.remove(&id).expect("the node was just found");
        self.index.remove(&(node.parent, node.key));
        if let Some(p) = self.nodes.get_mut(&node.parent) {
            p.children -= 1;
        }
        Some(node.page)
    }

    /// Empties the cache, giving back every page it held.
    pub fn clear(&mut self) -> Vec<u32> {
        self.index.clear();
        self.nodes.drain().map(|(_, n)| n.page).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: u32) -> PageKey {
        [Tok::Text(t); PAGE]
    }

    #[test]
    fn chains_are_found_by_content_and_parent() {
        let mut p: Prefixes<()> = Prefixes::default();
        let a = p.insert(ROOT, key(1), 10, ());
        p.insert(a, key(2), 11, ());
        // The same page content after another parent is another prefix.
        let b = p.insert(ROOT, key(2), 12, ());
        assert_eq!(
            p.lookup(&[key(1), key(2), key(3)]),
            vec![(a, 10), (a + 1, 11)]
        );
        assert_eq!(p.lookup(&[key(2), key(2)]), vec![(b, 12)]);
        assert!(p.lookup(&[key(3)]).is_empty());
        let img = |image| {
            let mut k = key(1);
            k[5] = Tok::Image { image, patch: 0 };
            k
        };
        p.insert(ROOT, img(7), 13, ());
        assert!(p.lookup(&[img(8)]).is_empty());
        assert_eq!(p.lookup(&[img(7)]).len(), 1);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_leaf() {
        let mut p: Prefixes<()> = Prefixes::default();
        let a = p.insert(ROOT, key(1), 10, ());
        p.insert(a, key(2), 11, ());
        p.insert(ROOT, key(3), 12, ());
        // 10 is the oldest but has a child; 11 is the oldest leaf.
        assert_eq!(p.evict(|_| true), Some(11));
        p.lookup(&[key(1)]);
        // Now 12 is older than 10.
        assert_eq!(p.evict(|_| true), Some(12));
        assert_eq!(p.evict(|page| page != 10), None);
        assert_eq!(p.evict(|_| true), Some(10));
        assert!(p.is_empty());
    }
}

//! Louvain community detection (Blondel et al. 2008) of a weighted undirected graph,
//! maximising modularity with a resolution parameter γ (Reichardt & Bornholdt):
//! `Q = 1/2m Σ_ij (A_ij − γ k_i k_j / 2m) δ(c_i, c_j)`. Local moving in a seeded random
//! order until no node moves, then the communities become the nodes of the next level,
//! until a level merges nothing. Deterministic for a seed.

use crate::model::rng::Rng;

/// A weighted undirected graph in compressed rows: the neighbours of node `i` are
/// `nbr[start[i]..start[i + 1]]` with weights `w[..]` (each edge in both rows, no self
/// loops), and `self_w[i]` is the diagonal entry `A_ii`.
#[derive(Debug, Clone)]
pub struct Graph {
    start: Vec<usize>,
    nbr: Vec<u32>,
    w: Vec<f64>,
    self_w: Vec<f64>,
}

impl Graph {
    /// From undirected edges `(i, j, weight)`, each listed once or in both directions
    /// (weights of repeated pairs are added); self loops go to the diagonal.
    pub fn from_edges(n: usize, edges: impl IntoIterator<Item = (u32, u32, f64)>) -> Graph {
        let mut self_w = vec![0f64; n];
        let mut both: Vec<(u32, u32, f64)> = Vec::new();
        for (i, j, w) in edges {
            if i == j {
                self_w[i as usize] += w;
            } else {
                both.push((i, j, w));
                both.push((j, i, w));
            }
        }
        Graph::from_directed(n, both, self_w)
    }

    /// From directed entries (both directions present), merging repeats.
    fn from_directed(n: usize, mut e: Vec<(u32, u32, f64)>, self_w: Vec<f64>) -> Graph {
        e.sort_unstable_by_key(|x| (x.0, x.1));
        let mut start = vec![0usize; n + 1];
        let (mut nbr, mut w) = (Vec::with_capacity(e.len()), Vec::with_capacity(e.len()));
        let mut p = 0;
        while p < e.len() {
            let (i, j) = (e[p].0, e[p].1);
            let mut s = 0.0;
            while p < e.len() && e[p].0 == i && e[p].1 == j {
                s += e[p].2;
                p += 1;
            }
            nbr.push(j);
            w.push(s);
            start[i as usize + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        Graph {
            start,
            nbr,
            w,
            self_w,
        }
    }

    pub fn len(&self) -> usize {
        self.self_w.len()
    }

    pub fn is_empty(&self) -> bool {
        self.self_w.is_empty()
    }

    fn row(&self, i: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
        let r = self.start[i]..self.start[i + 1];
        self.nbr[r.clone()]
            .iter()
            .zip(&self.w[r])
            .map(|(&j, &w)| (j as usize, w))
    }

    /// Row sums including the diagonal.
    fn degrees(&self) -> Vec<f64> {
        (0..self.len())
            .map(|i| self.self_w[i] + self.row(i).map(|(_, w)| w).sum::<f64>())
            .collect()
    }

    /// The graph of communities: `A'_CD = Σ_{i∈C, j∈D} A_ij`.
    fn aggregate(&self, comm: &[u32], n_comm: usize) -> Graph {
        let mut self_w = vec![0f64; n_comm];
        let mut e = Vec::new();
        for i in 0..self.len() {
            let c = comm[i];
            self_w[c as usize] += self.self_w[i];
            for (j, w) in self.row(i) {
                let d = comm[j];
                if d == c {
                    self_w[c as usize] += w;
                } else {
                    e.push((c, d, w));
                }
            }
        }
        Graph::from_directed(n_comm, e, self_w)
    }
}

/// Modularity of a partition at resolution `gamma`.
pub fn modularity(g: &Graph, comm: &[u32], gamma: f64) -> f64 {
    let k = g.degrees();
    let two_m: f64 = k.iter().sum();
    if two_m == 0.0 {
        return 0.0;
    }
    let n_comm = comm.iter().max().map_or(0, |&c| c as usize + 1);
    let (mut inside, mut tot) = (vec![0f64; n_comm], vec![0f64; n_comm]);
    for i in 0..g.len() {
        let c = comm[i] as usize;
        tot[c] += k[i];
        inside[c] += g.self_w[i];
        inside[c] += g
            .row(i)
            .filter(|&(j, _)| comm[j] as usize == c)
            .map(|(_, w)| w)
            .sum::<f64>();
    }
    (0..n_comm)
        .map(|c| inside[c] / two_m - gamma * (tot[c] / two_m).powi(2))
        .sum()
}

/// Most passes of local moving per level (each pass visits every node once).
const MAX_PASSES: usize = 64;

/// One level: move nodes between communities while modularity rises; the communities
/// numbered `0..` in order of first appearance.
fn local_moving(g: &Graph, gamma: f64, rng: &mut Rng) -> (Vec<u32>, usize) {
    let n = g.len();
    let k = g.degrees();
    let two_m: f64 = k.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let mut comm: Vec<u32> = (0..n as u32).collect();
    let mut tot = k.clone();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut to_comm = vec![0f64; n];
    let mut touched: Vec<usize> = Vec::new();
    for _ in 0..MAX_PASSES {
        let mut moved = false;
        for &i in &order {
            let own = comm[i] as usize;
            for (j, w) in g.row(i) {
                let c = comm[j] as usize;
                if to_comm[c] == 0.0 {
                    touched.push(c);
                }
                to_comm[c] += w;
            }
            tot[own] -= k[i];
            let gain = |c: usize| to_comm[c] - gamma * k[i] * tot[c] / two_m;
            let (mut best, mut best_gain) = (own, gain(own));
            for &c in &touched {
                let gc = gain(c);
                if gc > best_gain + 1e-12 * best_gain.abs().max(1e-300) {
                    (best, best_gain) = (c, gc);
                }
            }
            tot[best] += k[i];
            if best != own {
                comm[i] = best as u32;
                moved = true;
            }
            for &c in &touched {
                to_comm[c] = 0.0;
            }
            touched.clear();
        }
        if !moved {
            break;
        }
    }
    let mut renum = vec![u32::MAX; n];
    let mut next = 0u32;
    for c in comm.iter_mut() {
        if renum[*c as usize] == u32::MAX {
            renum[*c as usize] = next;
            next += 1;
        }
        *c = renum[*c as usize];
    }
    (comm, next as usize)
}

/// Communities of the nodes of `g` at resolution `gamma`, numbered `0..` by decreasing
/// size (ties by first node).
pub fn louvain(g: &Graph, gamma: f64, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed ^ 0x4C4F_5556_4149_4E21);
    let mut membership: Vec<u32> = (0..g.len() as u32).collect();
    let mut level = g.clone();
    loop {
        let (comm, n_comm) = local_moving(&level, gamma, &mut rng);
        if n_comm == level.len() {
            break;
        }
        for m in membership.iter_mut() {
            *m = comm[*m as usize];
        }
        level = level.aggregate(&comm, n_comm);
    }
    by_size(&mut membership);
    membership
}

/// Renumber labels `0..` by decreasing count, ties by first occurrence.
fn by_size(labels: &mut [u32]) {
    let n = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut count = vec![0usize; n];
    let mut first = vec![usize::MAX; n];
    for (i, &l) in labels.iter().enumerate() {
        count[l as usize] += 1;
        first[l as usize] = first[l as usize].min(i);
    }
    let mut order: Vec<usize> = (0..n).filter(|&l| count[l] > 0).collect();
    order.sort_by_key(|&l| (std::cmp::Reverse(count[l]), first[l]));
    let mut new = vec![0u32; n];
    for (r, &l) in order.iter().enumerate() {
        new[l] = r as u32;
    }
    labels.iter_mut().for_each(|l| *l = new[*l as usize]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cliques of `size` nodes joined in a ring by single edges.
    fn ring_of_cliques(cliques: usize, size: usize) -> Graph {
        let mut e = Vec::new();
        for c in 0..cliques {
            let base = (c * size) as u32;
            for a in 0..size as u32 {
                for b in a + 1..size as u32 {
                    e.push((base + a, base + b, 1.0));
                }
            }
            let next = (((c + 1) % cliques) * size) as u32;
            e.push((base, next + 1, 1.0));
        }
        Graph::from_edges(cliques * size, e)
    }

    #[test]
    fn finds_the_cliques() {
        let g = ring_of_cliques(6, 5);
        let c = louvain(&g, 1.0, 7);
        for q in 0..6 {
            let first = c[q * 5];
            assert!(c[q * 5..q * 5 + 5].iter().all(|&x| x == first), "{c:?}");
        }
        let mut distinct = c.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 6);
        // better than everything together or every node apart
        let q = modularity(&g, &c, 1.0);
        assert!(q > modularity(&g, &[0; 30], 1.0));
        assert!(q > modularity(&g, &(0..30).collect::<Vec<u32>>(), 1.0));
        // 6 cliques of 10 edges and 6 ring edges: Q = 60/66 − 6·(22/132)² = 0.7424…
        assert!((q - (60.0 / 66.0 - 6.0 * (22.0f64 / 132.0).powi(2))).abs() < 1e-12);
    }

    #[test]
    fn resolution_sets_the_scale() {
        let g = ring_of_cliques(8, 4);
        let count = |c: &[u32]| *c.iter().max().unwrap() as usize + 1;
        assert_eq!(count(&louvain(&g, 0.05, 1)), 1);
        assert!(count(&louvain(&g, 0.3, 1)) < 8);
        assert_eq!(count(&louvain(&g, 1.0, 1)), 8);
    }

    #[test]
    fn same_seed_same_answer_and_aggregation_keeps_modularity() {
        let g = ring_of_cliques(5, 6);
        assert_eq!(louvain(&g, 1.0, 3), louvain(&g, 1.0, 3));
        let c = louvain(&g, 1.0, 3);
        let agg = g.aggregate(&c, 5);
        let q = modularity(&g, &c, 1.0);
        assert!((modularity(&agg, &[0, 1, 2, 3, 4], 1.0) - q).abs() < 1e-12);
    }
}

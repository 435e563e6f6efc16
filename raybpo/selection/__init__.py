"""BPO's selection rules (docs/ALGORITHMS.md section 3), pure functions of lists and numpy arrays, free of Ray:
`clustering` (what both share: spherical k-means, the keep count, ranking, the `random` baseline, the counts),
`breadth` (prompts, 3.1) and `depth` (response pairs, 3.3). The stages feed them and write what they return."""

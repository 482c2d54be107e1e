"""The search space of PC-DARTS: the candidate operations on an edge and the genotypes that name a cell."""

"""Retrieval evaluation: revisitop-exact metrics, chunked search with the exact +1M fast path,
multi-scale extraction and the visual report.

  metrics.compute_map(ranks, gnd, kappas)       revisitop semantics (ranks: (n_db, n_queries))
  metrics.compute_protocols(ranks, raw_gnd)     Easy / Medium / Hard
  search.fast_compute_protocols(q, [db, ...])   the same numbers without sorting (for +1M)
  extract.Extractor(apply_fn, variables, cfg)   multi-scale descriptors, sharded, bounded compiles
"""

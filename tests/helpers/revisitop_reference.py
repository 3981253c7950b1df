"""Independent loop-based reference of revisitop's `compute_map` (tests only).

Written from the description of the original numpy evaluation code of the revisited Oxford/Paris
benchmark (Radenovic et al., CVPR 2018) and kept deliberately close to its structure: a Python loop
over queries, positions found by membership tests, a while loop that shifts the positives' positions
by the number of junk images ranked before them, a trapezoid rule over recall steps, and mP@k with
k clipped to the position of the last positive. `np.isin` replaces the removed `np.in1d`.
"""

import numpy as np


def reference_compute_ap(ranks, nres):
  """AP from the 0-based, junk-free positions `ranks` of the positives; `nres` positives in all."""
  ap = 0.0
  recall_step = 1.0 / nres
  for j in np.arange(len(ranks)):
    rank = ranks[j]
    if rank == 0:
      precision_0 = 1.0
    else:
      precision_0 = float(j) / rank
    precision_1 = float(j + 1) / (rank + 1)
    ap += (precision_0 + precision_1) * recall_step / 2.0
  return ap


def reference_compute_map(ranks, gnd, kappas=()):
  """Loop-based revisitop compute_map: returns (map, aps, pr, prs)."""
  mean_ap = 0.0
  nq = len(gnd)
  aps = np.zeros(nq)
  pr = np.zeros(len(kappas))
  prs = np.zeros((nq, len(kappas)))
  nempty = 0
  for i in np.arange(nq):
    qgnd = np.array(gnd[i]['ok'])
    if qgnd.shape[0] == 0:
      aps[i] = float('nan')
      prs[i, :] = float('nan')
      nempty += 1
      continue
    qgndj = np.array(gnd[i].get('junk', []))
    pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
    junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
    k = 0
    ij = 0
    if len(junk):
      ip = 0
      while ip < len(pos):
        while ij < len(junk) and pos[ip] > junk[ij]:
          k += 1
          ij += 1
        pos[ip] = pos[ip] - k
        ip += 1
    ap = reference_compute_ap(pos, len(qgnd))
    mean_ap = mean_ap + ap
    aps[i] = ap
    pos += 1
    for j in np.arange(len(kappas)):
      kq = min(max(pos), kappas[j])
      prs[i, j] = (pos <= kq).sum() / kq
    pr = pr + prs[i, :]
  mean_ap = mean_ap / (nq - nempty)
  pr = pr / (nq - nempty)
  return mean_ap, aps, pr, prs


def reference_protocol_gnd(gnd, protocol):
  """revisitop's Easy/Medium/Hard assembly of 'ok'/'junk' from 'easy'/'hard'/'junk'."""
  out = []
  cat = np.concatenate
  for g in gnd:
    if protocol == 'easy':
      out.append({'ok': cat([g['easy']]), 'junk': cat([g['junk'], g['hard']])})
    elif protocol == 'medium':
      out.append({'ok': cat([g['easy'], g['hard']]), 'junk': cat([g['junk']])})
    elif protocol == 'hard':
      out.append({'ok': cat([g['hard']]), 'junk': cat([g['junk'], g['easy']])})
    else:
      raise ValueError(protocol)
  return out

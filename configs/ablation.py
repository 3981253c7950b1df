"""The paper's ablations (R50, paper recipe) selected by name: --config=configs/ablation.py:NAME.

Each variant changes one thing relative to configs/r50.py ('full'):

  full               the paper's DOLG R50
  no_local           global branch only (no local branch, no fusion)
  no_multi_atrous    local branch without the multi-atrous module
  no_self_attention  local branch without self-attention (multi-atrous output as f_l)
  fusion_concat      concatenate pooled f_l and f_g instead of orthogonal fusion
  fusion_hadamard    element-wise product of pooled f_l and f_g
  pool_gap           global average pooling instead of GeM
  fuse_res4          local branch on res4 instead of res3 (fuse-stage table)
  fuse_both          local branches on res3 and res4

  python -m dolg_jax.main --config=configs/ablation.py:no_local --workdir=DIR
"""

from dolg_jax.configs import r50

VARIANTS = {
    'full': {},
    'no_local': {'use_local_branch': False},
    'no_multi_atrous': {'use_multi_atrous': False},
    'no_self_attention': {'use_self_attention': False},
    'fusion_concat': {'fusion': 'concat'},
    'fusion_hadamard': {'fusion': 'hadamard'},
    'pool_gap': {'global_pool': 'gap'},
    'fuse_res4': {'local_stage': 'res4'},
    'fuse_both': {'local_stage': 'both'},
}


def get_config(name: str = 'full'):
  if name not in VARIANTS:
    raise ValueError(f'configs/ablation.py: unknown ablation {name!r}; choose one of '
                     f'{sorted(VARIANTS)}')
  c = r50.get_config()
  c.model.update(VARIANTS[name])
  c.ablation = name
  return c

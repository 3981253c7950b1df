"""GLDv2 dataset names (`gldv2/<config>`) and their TFDS builder configs.

Named configs `clean` / `full` (val_fraction 0.2) and `clean_all` / `full_all` (0), optionally
followed by `-val<F>` (another validation fraction) and `-ex<12 hex>` (an exclusion list, the
first hex digits of its sha256): each name has its own directory.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

import tensorflow_datasets as tfds

from dolg_jax.data import gldv2_listing
from dolg_jax.data.build_plan import Exclusion


class Gldv2Config(tfds.core.BuilderConfig):
  """A listing (`clean`: train_clean.csv, `full`: train.csv) with its build options."""

  def __init__(
    self,
    *,
    subset: str,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    name: Optional[str] = None,
    exclusion: Optional[Exclusion] = None,
    exclusion_tag: str = '',
    **kwargs,
  ):
    super().__init__(name=name or subset, **kwargs)
    self.subset = subset
    self.val_fraction = val_fraction
    self.split_seed = split_seed
    self.exclusion = exclusion
    self.exclusion_tag = exclusion.tag if exclusion is not None else exclusion_tag

  def build_options(self) -> dict:
    return {
      'subset': self.subset,
      'val_fraction': self.val_fraction,
      'split_seed': self.split_seed,
      'exclusion': (
        gldv2_listing.describe_exclusion(self.exclusion) if self.exclusion is not None else None
      ),
    }


BUILDER_CONFIGS = [
  Gldv2Config(subset='clean', description='GLDv2-clean: 1,580,470 images, 81,313 landmarks.'),
  Gldv2Config(subset='full', description='GLDv2 train: 4,132,914 images, 203,094 landmarks.'),
  Gldv2Config(
    subset='clean',
    name='clean_all',
    val_fraction=0.0,
    description='GLDv2-clean, every image in train (no validation split).',
  ),
  Gldv2Config(
    subset='full',
    name='full_all',
    val_fraction=0.0,
    description='GLDv2 train, every image in train (no validation split).',
  ),
]
# Named configs: listing and validation fraction.
NAMED_CONFIGS = {c.name: (c.subset, c.val_fraction) for c in BUILDER_CONFIGS}
_SUFFIX_RE = re.compile(r'-(val(?P<val>\d+(\.\d+)?)|ex(?P<ex>[0-9a-f]{12}))')


def config_name(
  base: str, *, val_fraction: Optional[float] = None, exclusion: Optional[Exclusion] = None
) -> str:
  """The config name of a named config with build options (see the module docstring)."""
  if base not in NAMED_CONFIGS:
    raise ValueError(f'unknown gldv2 config {base!r}; known: {sorted(NAMED_CONFIGS)}')
  name = base
  if val_fraction is not None and val_fraction != NAMED_CONFIGS[base][1]:
    if not 0.0 <= val_fraction < 1.0 or round(val_fraction, 4) != val_fraction:
      raise ValueError(
        f'val_fraction must be in [0, 1) with at most 4 decimals, got {val_fraction}'
      )
    name += '-val' + f'{val_fraction:.4f}'.rstrip('0').rstrip('.')
  if exclusion is not None:
    name += f'-ex{exclusion.tag}'
  return name


def parse_config_name(name: str) -> Tuple[str, float, str]:
  """'clean_all-ex0123456789ab' -> (base, val_fraction, exclusion tag or '')."""
  base, _, rest = name.partition('-')
  if base not in NAMED_CONFIGS:
    raise ValueError(
      f'unknown gldv2 config {name!r}: it must start with one of '
      f'{sorted(NAMED_CONFIGS)}, optionally followed by -val<F> and -ex<12 hex>'
    )
  val, tag = NAMED_CONFIGS[base][1], ''
  rest = '-' + rest if rest else ''
  for m in _SUFFIX_RE.finditer(rest):
    if m.group('val') is not None:
      val = float(m.group('val'))
    else:
      tag = m.group('ex')
  if _SUFFIX_RE.sub('', rest):
    raise ValueError(
      f'bad gldv2 config name {name!r}: after {base!r} only -val<F> (e.g. -val0.1) '
      'and -ex<first 12 hex digits of the exclusion list sha256> may follow'
    )
  return base, val, tag


def resolve_config(
  dataset: str, *, val_fraction: Optional[float] = None, exclude: Optional[str] = None
) -> Gldv2Config:
  """The builder config of a dataset name plus build options (see the module docstring).

  `val_fraction` / `exclude` (a file) may also be given on top of a name; the result's name
  encodes all of them. A name with `-ex<tag>` given together with `exclude` must match its sha256.
  """
  name, _, config = dataset.partition('/')
  if name != 'gldv2':
    raise ValueError(f'not a gldv2 dataset name: {dataset!r}')
  base, named_val, tag = parse_config_name(config or 'clean')
  if val_fraction is not None and config and '-val' in config and val_fraction != named_val:
    raise ValueError(
      f'{dataset!r} names validation fraction {named_val:g} but val_fraction='
      f'{val_fraction:g} was given'
    )
  val = named_val if val_fraction is None else float(val_fraction)
  if not 0.0 <= val < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val}')
  exclusion = gldv2_listing.read_exclusion(exclude) if exclude else None
  if exclusion is not None and tag and tag != exclusion.tag:
    raise ValueError(
      f'{dataset!r} was built with an exclusion list whose sha256 starts with '
      f'{tag}, but {exclude} has sha256 {exclusion.sha256[:12]}...'
    )
  full = config_name(base, val_fraction=val, exclusion=exclusion)
  if exclusion is None and tag:
    full += f'-ex{tag}'
  if full == base:
    return next(c for c in BUILDER_CONFIGS if c.name == base)
  subset = NAMED_CONFIGS[base][0]
  return Gldv2Config(
    subset=subset,
    name=full,
    val_fraction=val,
    exclusion=exclusion,
    exclusion_tag=tag,
    description=f'gldv2/{base} with build options',
  )

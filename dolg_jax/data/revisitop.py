"""TFDS builders `roxford5k`, `rparis6k`, `revisitop1m`, `rdemo` (revisitop layout) -> ArrayRecord.

`prepare(name, manual_dir, data_dir)` reads jpg/<name>.jpg and gnd_<name>.pkl (revisitop1m:
revisitop1m.txt and jpg/<line>) and writes split 'index' (and 'query' where there is a gnd) of
{image: original bytes, id, index: int64 position in imlist / qimlist / the list, height, width,
bbx: float32 [x1, y1, x2, y2], the query box or the whole image}, not in list order (place by
`index`); beside the data: summary.json and the gnd's copy (`load_gnd`). Absent images raise
`MissingImagesError` (allow_missing: recorded in summary.json instead), a bad gnd
csv_metadata.MetadataError, reading an unprepared dataset `NotPreparedError` naming the prepare
command (`require_prepared` checks several). Layouts and sizes: docs/design_notes.md.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from dolg_jax.data import csv_metadata
from dolg_jax.data import decode
from dolg_jax.data.builder_mixin import PackagedBuilder

OFFICIAL_COUNTS = {'roxford5k': (4993, 70), 'rparis6k': (6322, 70), 'revisitop1m': (1001001, 0)}
# 'rdemo': the embedded demo's benchmark (dolg_jax.demo), same layout, no official size.
NAMES = tuple(OFFICIAL_COUNTS) + ('rdemo',)
_MAX_IN_MESSAGE = 5


# What the manual dir of each dataset holds (for messages; the layouts: docs/design_notes.md).
MANUAL_LAYOUT = {
  'roxford5k': 'jpg/, gnd_roxford5k.pkl',
  'rparis6k': 'jpg/, gnd_rparis6k.pkl',
  'revisitop1m': 'revisitop1m.txt, jpg/',
  'rdemo': 'jpg/, gnd_rdemo.pkl, as python -m dolg_jax.demo writes them',
}


class MissingImagesError(RuntimeError):
  """Images listed by the ground truth / list file are absent from the manual dir."""


class NotPreparedError(FileNotFoundError):
  """A dataset is not prepared under the data dir; the message says how to prepare it."""


def prepare_command(name: str, data_dir: str) -> str:
  """The command that prepares `name` (or NAME) into `data_dir`."""
  return (
    f'python -m dolg_jax.data.prepare --dataset={name} --manual_dir=M '
    f'--data_dir={data_dir or "DATA_DIR"}'
  )


def not_prepared_message(names: Sequence[str], data_dir: str) -> str:
  """One line: which of `names` are not prepared under `data_dir` and the command to do it."""
  where = data_dir or 'the current directory (the data dir is empty)'
  if len(names) == 1:
    return (
      f'{names[0]} is not prepared under {where}: prepare it with '
      f'`{prepare_command(names[0], data_dir)}`, M holding its revisitop files '
      f'({MANUAL_LAYOUT[names[0]]}; github.com/filipradenovic/revisitop)'
    )
  layouts = '; '.join(f'{n}: {MANUAL_LAYOUT[n]}' for n in names)
  return (
    f'{", ".join(names)} are not prepared under {where}: prepare each with '
    f'`{prepare_command("NAME", data_dir)}`, M holding its revisitop files ({layouts}; '
    'github.com/filipradenovic/revisitop)'
  )


def require_prepared(names: Sequence[str], data_dir: str) -> None:
  """Raises NotPreparedError naming every one of `names` not prepared under `data_dir`."""
  missing = [n for n in dict.fromkeys(names) if not builder(n, data_dir).is_prepared()]
  if missing:
    raise NotPreparedError(not_prepared_message(missing, data_dir))


def _missing_message(name: str, root: str, missing: Sequence[str], total: int) -> str:
  first = ', '.join(missing[:_MAX_IN_MESSAGE])
  return (
    f'{name}: {len(missing)} of {total} listed images are missing under {root} '
    f'(first: {first}). Download/extract them into that directory, or pass '
    'allow_missing=True.'
  )


def read_gnd_file(path: str) -> dict:
  """Reads and checks gnd_<name>.pkl; returns the dict."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} not found: the manual dir must hold the revisitop ground truth'
    )
  try:
    with open(path, 'rb') as f:
      cfg = pickle.load(f)
  except (
    pickle.UnpicklingError,
    EOFError,
    UnicodeDecodeError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
  ) as e:
    raise csv_metadata.MetadataError(
      f'{path}: not a readable ground-truth pickle ({type(e).__name__}: {e}); re-download it'
    ) from None
  return csv_metadata.check_gnd(cfg, path)


def read_r1m_list(path: str) -> list[str]:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: the manual dir must hold revisitop1m.txt')
  return csv_metadata.read_lines(path)


def _check_present(name, root, relpaths, allow_missing):
  missing = [p for p in relpaths if not os.path.isfile(os.path.join(root, p))]
  if missing and not allow_missing:
    raise MissingImagesError(_missing_message(name, root, missing, len(relpaths)))
  return missing


class _RevisitopBuilder(PackagedBuilder, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic; subclasses set the name via their class name."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  SPLITS: tuple[str, ...] = ('index', 'query')

  def __init__(self, *, allow_missing: bool = False, **kwargs):
    self._allow_missing = allow_missing
    self._summary: dict = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Tensor(shape=(), dtype=np.object_),
          'id': tfds.features.Text(),
          'index': tfds.features.Scalar(dtype=np.int64),
          'height': tfds.features.Scalar(dtype=np.int64),
          'width': tfds.features.Scalar(dtype=np.int64),
          'bbx': tfds.features.Tensor(shape=(4,), dtype=np.float32),
        }
      ),
      homepage='https://github.com/filipradenovic/revisitop',
      metadata=tfds.core.MetadataDict(),
    )

  def _example(self, path: str, image_id: str, index: int, bbx=None) -> dict:
    with open(path, 'rb') as f:
      data = f.read()
    h, w = decode.image_size(data)
    box = np.array(bbx if bbx is not None else (0, 0, w, h), np.float32)
    return {'image': data, 'id': image_id, 'index': index, 'height': h, 'width': w, 'bbx': box}

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    out = os.fspath(self.data_path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'summary.json'), 'w') as f:
      json.dump(self._summary, f, indent=1)
    self.info.metadata.update({k: v for k, v in self._summary.items() if k != 'missing'})


class _GndBuilder(_RevisitopBuilder, skip_registration=True):
  """roxford5k / rparis6k."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the revisitop files in the manual dir: jpg/<name>.jpg for every image and gnd_<name>.pkl
  (see https://github.com/filipradenovic/revisitop, python/download.py).
  """

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    gnd_path = os.path.join(root, f'gnd_{self.name}.pkl')
    cfg = read_gnd_file(gnd_path)
    self._gnd_path = gnd_path
    rel = [os.path.join('jpg', n + '.jpg') for n in list(cfg['imlist']) + list(cfg['qimlist'])]
    missing = _check_present(self.name, root, sorted(set(rel)), self._allow_missing)
    official = OFFICIAL_COUNTS.get(self.name)
    self._summary = {
      'name': self.name,
      'num_index': len(cfg['imlist']),
      'num_query': len(cfg['qimlist']),
      'official_counts': list(official) if official else None,
      'matches_official_counts': (len(cfg['imlist']), len(cfg['qimlist'])) == official,
      'num_missing': len(missing),
      'missing': missing,
    }
    self._root, self._cfg, self._missing = root, cfg, set(missing)
    return {'index': self._generate_examples('index'), 'query': self._generate_examples('query')}

  def _generate_examples(self, split):
    names = self._cfg['imlist'] if split == 'index' else self._cfg['qimlist']
    for i, n in enumerate(names):
      rel = os.path.join('jpg', n + '.jpg')
      if rel in self._missing:
        continue
      bbx = self._cfg['gnd'][i]['bbx'] if split == 'query' else None
      yield f'{split}_{i:08d}', self._example(os.path.join(self._root, rel), n, i, bbx)

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    shutil.copyfile(self._gnd_path, os.path.join(os.fspath(self.data_path), f'gnd_{self.name}.pkl'))


class Roxford5k(_GndBuilder):
  """Revisited Oxford 5k (4,993 index images, 70 queries with boxes)."""


class Rparis6k(_GndBuilder):
  """Revisited Paris 6k (6,322 index images, 70 queries with boxes)."""


class Rdemo(_GndBuilder):
  """The embedded demo's benchmark (procedural places, data.synthetic.demo_data) in this layout."""


class Revisitop1m(_RevisitopBuilder):
  """R1M distractors (1,001,001 images listed in revisitop1m.txt)."""

  SPLITS = ('index',)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put revisitop1m.txt and the extracted jpg/ tree (revisitop1m.N.tar.gz) in the manual dir.
  """

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    names = read_r1m_list(os.path.join(root, 'revisitop1m.txt'))
    missing = _check_present(
      self.name, root, [os.path.join('jpg', n) for n in names], self._allow_missing
    )
    self._summary = {
      'name': self.name,
      'num_index': len(names),
      'num_query': 0,
      'official_counts': list(OFFICIAL_COUNTS[self.name]),
      'matches_official_counts': len(names) == OFFICIAL_COUNTS[self.name][0],
      'num_missing': len(missing),
      'missing': missing,
    }
    self._root, self._names, self._missing = root, names, set(missing)
    return {'index': self._generate_examples('index')}

  def _generate_examples(self, split):
    for i, n in enumerate(self._names):
      rel = os.path.join('jpg', n)
      if rel in self._missing:
        continue
      yield f'{split}_{i:08d}', self._example(os.path.join(self._root, rel), n, i)


_BUILDERS = {
  'roxford5k': Roxford5k,
  'rparis6k': Rparis6k,
  'revisitop1m': Revisitop1m,
  'rdemo': Rdemo,
}


def builder(name: str, data_dir: Optional[str] = None, **kwargs) -> _RevisitopBuilder:
  """Builder for 'roxford5k' | 'rparis6k' | 'revisitop1m' | 'rdemo' (kwargs: allow_missing)."""
  if name not in _BUILDERS:
    raise ValueError(f'unknown revisitop dataset {name!r}; expected one of {NAMES}')
  kwargs.setdefault('file_format', 'array_record')
  return _BUILDERS[name](data_dir=data_dir, **kwargs)


def prepare(name: str, manual_dir: str, data_dir: str, *, allow_missing: bool = False):
  """Builds the dataset from `manual_dir` (no-op if already prepared); returns the builder."""
  b = builder(name, data_dir, allow_missing=allow_missing)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return b


def data_source(name: str, data_dir: str, split: str):
  """Random-access source of a prepared split ('index' or 'query')."""
  require_prepared([name], data_dir)
  return builder(name, data_dir).as_data_source()[split]


def load_gnd(name: str, data_dir: str) -> dict:
  """The ground truth pickle copied next to the prepared data (roxford5k / rparis6k / rdemo)."""
  require_prepared([name], data_dir)
  path = os.path.join(os.fspath(builder(name, data_dir).data_path), f'gnd_{name}.pkl')
  return read_gnd_file(path)


def load_summary(name: str, data_dir: str) -> dict:
  require_prepared([name], data_dir)
  with open(os.path.join(os.fspath(builder(name, data_dir).data_path), 'summary.json')) as f:
    return json.load(f)


def iter_examples(source) -> Iterator[dict]:
  """All examples of a data source, in storage order (use ex['index'] to place them)."""
  for i in range(len(source)):
    yield source[i]
